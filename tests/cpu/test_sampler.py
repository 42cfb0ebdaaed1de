"""The sampler's options on fixed logits against transformers' logits processors as the torch reference
(top_k, top_p, min_p, repetition_penalty, min_tokens), and stop_token_ids / min_tokens in the running engine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from serving.engine import EngineOptions, LLMEngine
from serving.sampler import SamplingParams, draw, process_logits, sample, sampling_probs

VOCAB = 50


@dataclass
class Seq:
    params: SamplingParams
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None
    generator: torch.Generator | None = None


@pytest.fixture
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, VOCAB, generator=g) * 3


def _ours(logits: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
    probs = sampling_probs(process_logits(logits, seqs), [s.params for s in seqs])
    return probs / probs.sum(-1, keepdim=True)


def _ref(logits: torch.Tensor, *warpers) -> torch.Tensor:
    x = logits.clone()
    for w in warpers:
        x = w(None, x)
    return torch.softmax(x, -1)


def _check(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(ours > 0, ref > 0), "different tokens kept"
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 17])
def test_top_k_matches_reference(logits, k):
    seqs = [Seq(SamplingParams(temperature=0.7, top_k=k)) for _ in range(4)]
    _check(_ours(logits, seqs), _ref(logits, TemperatureLogitsWarper(0.7), TopKLogitsWarper(k)))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_top_p_matches_reference(logits, p):
    seqs = [Seq(SamplingParams(temperature=1.3, top_p=p)) for _ in range(4)]
    _check(_ours(logits, seqs), _ref(logits, TemperatureLogitsWarper(1.3), TopPLogitsWarper(p)))


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_matches_reference(logits, min_p):
    seqs = [Seq(SamplingParams(temperature=0.9, min_p=min_p)) for _ in range(4)]
    _check(_ours(logits, seqs), _ref(logits, TemperatureLogitsWarper(0.9), MinPLogitsWarper(min_p)))


def test_min_p_then_top_k_then_top_p_per_row(logits):
    # vLLM's order; each row its own settings (one batch mixes requests)
    settings = [dict(top_k=8, top_p=0.8, min_p=0.1), dict(top_k=0, top_p=0.6), dict(top_k=3), dict()]
    seqs = [Seq(SamplingParams(temperature=0.8, **kw)) for kw in settings]
    ours = _ours(logits, seqs)
    for i, kw in enumerate(settings):
        ws = [TemperatureLogitsWarper(0.8)]
        ws += [MinPLogitsWarper(kw["min_p"])] if kw.get("min_p") else []
        ws += [TopKLogitsWarper(kw["top_k"])] if kw.get("top_k") else []
        ws += [TopPLogitsWarper(kw["top_p"])] if kw.get("top_p") else []
        _check(ours[i:i + 1], _ref(logits[i:i + 1], *ws))


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_reference_over_prompt_and_output(logits, penalty):
    seqs = [Seq(SamplingParams(repetition_penalty=penalty), prompt_ids=[1, 2, 3 + i], output_ids=[7, 7, 20 + i])
            for i in range(4)]
    ids = torch.tensor([s.prompt_ids + s.output_ids for s in seqs])
    ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    got = process_logits(logits, seqs)
    torch.testing.assert_close(got, ref)
    assert not torch.equal(got, logits)
    assert torch.equal(process_logits(logits, [Seq(SamplingParams())] * 4), logits)  # 1.0: untouched


def test_min_tokens_masks_eos_and_stop_ids_until_reached(logits):
    eos, stop_id = int(logits[0].argmax()), int(logits[0].argsort()[-2])  # the two most likely tokens of row 0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop_id],
                            all_stop_token_ids=[eos, stop_id])
    ref_proc = MinNewTokensLengthLogitsProcessor(0, 3, [eos, stop_id])
    for n_out in range(5):
        s = Seq(params, output_ids=[9] * n_out)
        got = process_logits(logits[:1], [s])
        torch.testing.assert_close(got, ref_proc(torch.tensor([[9] * n_out]), logits[:1].clone()))
        token = sample(logits[:1], [s])[0][0]
        assert (token == eos) == (n_out >= 3), (n_out, token)


def test_seeded_draws_stay_inside_the_filtered_set(logits):
    params = SamplingParams(temperature=1.5, top_k=4, min_p=0.02, seed=123)
    allowed = set(_ref(logits[:1], TemperatureLogitsWarper(1.5), MinPLogitsWarper(0.02),
                       TopKLogitsWarper(4))[0].nonzero().flatten().tolist())
    s = Seq(params)
    drawn = {sample(logits[:1], [s])[0][0] for _ in range(200)}
    assert drawn <= allowed and len(drawn) > 1


def test_inverse_cdf_draw_gives_each_token_its_share_and_never_a_zero_one(logits):
    """``draw`` over a grid of uniforms: token j is picked for a fraction of the grid equal to its probability
    (within one grid step), tokens of probability 0 never, and greedy rows (u < 0) keep the argmax via ``sample``."""
    probs = sampling_probs(logits, [SamplingParams(temperature=1.0, top_k=6)] * 4)  # unnormalized, zeros outside
    n = 4096
    for row in range(4):
        u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        got = draw(probs[row:row + 1].expand(n, -1), u)
        share = torch.bincount(got, minlength=VOCAB).double() / n
        want = probs[row].double() / probs[row].double().sum()
        assert torch.all(share[want == 0] == 0)
        torch.testing.assert_close(share, want, atol=1.5 / n, rtol=0)
    seqs = [Seq(SamplingParams(temperature=0.0)), Seq(SamplingParams(temperature=1.0, seed=1))] * 2
    tokens, _ = sample(logits, seqs)
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())


def test_logits_processor_hook_sees_output_ids_and_masks(logits):
    seen: list[list[int]] = []

    def only_even(output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        seen.append(list(output_ids))
        out = row.clone()
        out[1::2] = float("-inf")
        return out

    s = Seq(SamplingParams(temperature=1.0, seed=5, logits_processors=[only_even]), output_ids=[4, 6])
    tokens = {sample(logits[:1], [s])[0][0] for _ in range(50)}
    assert all(t % 2 == 0 for t in tokens) and seen[0] == [4, 6]


# ----------------------------------------------------------------------------------------------- in the engine


@pytest.fixture(scope="module")
def engine(tiny_model: Path):
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=128, max_num_seqs=2, max_waiting=2,
                                              warmup=False))
    eng.load_and_start()
    yield eng
    eng.shutdown()


def _run(eng: LLMEngine, params: SamplingParams) -> tuple[list[int], str | None]:
    async def go():
        outs = [o async for o in eng.generate(eng.tokenizer("Hello, how are")["input_ids"], params)]
        return [t for o in outs for t in o.token_ids], outs[-1].finish_reason

    return asyncio.run(go())


def test_stop_token_ids_and_min_tokens_in_the_engine(engine: LLMEngine):
    ids, reason = _run(engine, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert reason == "length" and len(ids) == 12
    target = ids[4]
    first = ids.index(target)
    got, reason = _run(engine, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[target]))
    assert reason == "stop" and got == ids[:first]  # the stop id itself is not part of the output
    # min_tokens past the stop id's first place: the stop id is masked there, so the text differs from that point
    later, reason = _run(engine, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[target],
                                                min_tokens=first + 1,
                                                all_stop_token_ids=sorted(engine.eos_ids | {target})))
    assert len(later) > first + 1 and later[:first] == ids[:first] and later[first] != target
