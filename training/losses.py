"""Every loss and advantage computation of the stages (SFT, RM, PPO, DPO, GRPO), as plain tensor functions."""

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


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over the tokens ``loss_mask`` marks (the response), per row; [B].

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, so ``loss_mask`` is aligned with ``input_ids`` and its first
    column is never counted.
    """
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return (logp * loss_mask[:, 1:].to(logp.dtype)).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO on per-sequence response log-probs; returns (mean loss, implicit reward of chosen, of rejected) [B].

    The implicit reward is ``beta * (log pi - log pi_ref)``. ``sigmoid``: -log sigmoid(r_chosen - r_rejected)
    (Rafailov et al. 2023); with ``label_smoothing`` eps, each pair's label is taken as wrong with probability eps:
    -(1 - eps) log sigmoid(m) - eps log sigmoid(-m) (conservative DPO, Mitchell 2023), whose gradient vanishes at a
    finite margin instead of pushing it on for ever; for noisy preference data such as HH's. ``ipo``:
    (h - 1 / (2 beta))^2 with h the log-ratio margin (Azar et al. 2023), which does not push the margin to
    infinity on separable pairs either.
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    if kind == "sigmoid":
        margin = chosen - rejected
        loss = -F.logsigmoid(margin)
        if label_smoothing:
            loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-margin)
    elif kind == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing is for the sigmoid loss; ipo has no labels to smooth")
        h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo loss kind must be sigmoid or ipo, got {kind!r}")
    return loss.mean(), chosen.detach(), rejected.detach()


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                     scale: bool = True) -> torch.Tensor:
    """GRPO: each sample's reward minus its group's mean (divided by the group's std when ``scale``); [B].

    ``rewards`` holds ``group_size`` consecutive samples per prompt. A group whose samples all score the same gets
    zero advantage (nothing to learn from it), not a division by zero.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.float().view(-1, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (g.std(dim=1, keepdim=True, unbiased=False) + eps)
    return adv.view(-1)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate exp(d) - d - 1 with d = log pi_ref - log pi: never negative, unbiased
    under samples from pi, and zero (with zero gradient) where the policy equals the reference; [B, T].

    ``d`` is clamped to +/-20 so a padding position (or a collapsed token) cannot overflow ``exp``.
    """
    d = ((ref_logprobs - logprobs) * mask).clamp(-20, 20)
    return (torch.exp(d) - d - 1) * mask


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float,
              kl_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy surrogate with the sequence's advantage at every response token, plus ``kl_coef`` times the
    KL to the reference (in the loss, not the reward, as GRPO does); returns (loss, detached parts)."""
    pg, clip_frac = policy_loss(logprobs, old_logprobs, advantages.unsqueeze(1).expand_as(logprobs), mask, clip_eps)
    kl = masked_mean(kl_k3(logprobs, ref_logprobs, mask), mask)
    loss = pg + kl_coef * kl
    return loss, {"policy_loss": pg.detach(), "kl_loss": kl.detach(), "clip_frac": clip_frac.detach()}
