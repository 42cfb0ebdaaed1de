"""Every loss and advantage computation of the three stages, as plain tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[t] | ...) from logits aligned with ``tokens`` (caller shifts); [B, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on labelled (assistant) tokens; returns (mean loss, token count).

    The labels are shifted rather than the logits (no copy of the [B, T, V] tensor), and the count stays on the
    device, so the loss launches no host synchronisation.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    n = (targets != IGNORE_INDEX).sum()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / n.clamp(min=1), n


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), averaged."""
    return -F.logsigmoid(chosen - rejected).mean()


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log p - log p_ref (zero when the policy equals the reference)."""
    return logprobs - ref_logprobs


def shaped_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL at every response token, plus the score at the last one.

    Returns (rewards [B, T], kl [B, T]); both zero where ``mask`` is 0.
    """
    kl = kl_penalty(logprobs, ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.long().cumsum(dim=1) == mask.long().sum(dim=1, keepdim=True)) & mask.bool()
    rewards = rewards + last.to(rewards.dtype) * score.unsqueeze(1)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns)."""
    T = rewards.size(1)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    values = values * mask
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    returns = adv + values
    return adv, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate; returns (loss, clip fraction).

    The log-ratio is zeroed outside ``mask`` before exponentiating: a padding position's ratio could overflow to
    inf, and inf * 0 is NaN.
    """
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    loss = -masked_mean(torch.min(unclipped, clipped), mask)
    clip_frac = masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)
    return loss, clip_frac


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Clipped value loss (max of clipped and unclipped squared errors), halved."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return masked_mean(ent, mask)
