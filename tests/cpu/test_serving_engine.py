"""Engine mechanics on CPU with tiny random models: batching correctness vs HF generate, int8 cache, GPTQ, config."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch

from serving.config import ConfigError, ServeConfig, load_serve_config, resolve_model_path
from serving.engine import ContextLengthError, EngineError, EngineOptions, LLMEngine, QueueFullError, SamplingParams
from serving.kv_cache import KVCacheManager

PROMPTS = ["Hello, how are", "The capital of France", "Two plus two", "Write a poem", "PPO improves", "你好"]


def _generate_all(eng: LLMEngine, prompts: list[str], max_tokens: int, stagger: float = 0.0) -> list[list[int]]:
    async def one(i: int, p: str) -> list[int]:
        await asyncio.sleep(stagger * i)  # later requests join a running batch
        ids = eng.tokenizer(p)["input_ids"]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [t for o in [o async for o in eng.generate(ids, params)] for t in o.token_ids]

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(run())


def _reference(model, tok, prompt: str, max_tokens: int) -> list[int]:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def engine(tiny_model: Path):
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=128, max_num_seqs=4, max_waiting=3))
    eng.load_and_start()
    yield eng
    eng.shutdown()


def test_continuous_batching_matches_generate(engine: LLMEngine):
    # 6 requests, 4 slots, staggered arrivals: requests wait, join mid-batch, and finished rows get compacted
    got = _generate_all(engine, PROMPTS, max_tokens=10, stagger=0.02)
    for p, toks in zip(PROMPTS, got, strict=True):
        assert toks == _reference(engine._model, engine.tokenizer, p, 10), p
    assert engine.load_stats()["running"] == 0


def test_stop_strings_and_sampling(engine: LLMEngine):
    ids = engine.tokenizer("Hello, how are")["input_ids"]
    full = engine.tokenizer.decode(_reference(engine._model, engine.tokenizer, "Hello, how are", 12),
                                   skip_special_tokens=True)
    stop = full[3:6]
    assert stop.strip(), full

    async def run(params: SamplingParams) -> tuple[str, str]:
        outs = [o async for o in engine.generate(ids, params)]
        return "".join(o.text for o in outs), outs[-1].finish_reason

    text, reason = asyncio.run(run(SamplingParams(max_tokens=12, temperature=0.0, stop=[stop], ignore_eos=True)))
    assert reason == "stop" and text == full[:full.find(stop)]
    a = asyncio.run(run(SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)))
    b = asyncio.run(run(SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)))
    assert a == b and a[1] == "length"


def test_admission_errors(engine: LLMEngine):
    with pytest.raises(ContextLengthError) as e:
        engine.add_request([1] * 100, SamplingParams(max_tokens=50), lambda o: None)
    # the numbers, no wire field name (the API layer sets param)
    msg = str(e.value)
    assert "100 prompt tokens" in msg and "max_tokens=50" in msg and "128 tokens" in msg and e.value.param is None
    sinks = []
    with pytest.raises(QueueFullError):
        for _ in range(20):  # 4 slots + 3 waiting, nothing drained yet
            sinks.append(engine.add_request([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True),
                                            lambda o: None))
    for s in sinks:
        engine.abort(s.id)
    for _ in range(100):
        if engine.load_stats()["running"] == 0 and engine.load_stats()["waiting"] == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    stats = engine.load_stats()
    assert (stats["running"], stats["waiting"], stats["slots"]) == (0, 0, 4)
    assert stats["free_blocks"] == stats["total_blocks"] and stats["kv_usage"] == 0


def _stream_all(eng: LLMEngine, prompts: list[list[int]], max_tokens: int, stagger: float = 0.0) -> list[list[int]]:
    async def one(i: int, ids: list[int]) -> list[int]:
        await asyncio.sleep(stagger * i)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [t for o in [o async for o in eng.generate(ids, params)] for t in o.token_ids]

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(run())


def _hf(model, ids: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False)
    return out[0, len(ids):].tolist()


def test_paged_prefix_hits_match_generate_and_are_counted(tiny_model: Path):
    """Blocks of 8 tokens, prompts of 19-30 tokens sharing a 16-token system prefix, 20 new tokens each (several
    block boundaries), chunked prefill of 16: greedy fp32 tokens equal HF generate, the second and later prompts
    start after the cached prefix, and the metrics count the reused tokens."""
    from serving.metrics import EngineMetrics

    metrics = EngineMetrics("tiny")
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=96, max_num_seqs=4, block_size=8,
                                              prefill_chunk=16, warmup=False), stats=metrics)
    eng.load_and_start()
    try:
        tok = eng.tokenizer
        system = (tok("You are a helpful assistant. Answer briefly.")["input_ids"] * 3)[:16]
        prompts = [system + tok(p)["input_ids"] for p in PROMPTS[:4]]
        first = _stream_all(eng, prompts[:1], 20)
        assert metrics.prefix_hits._value.get() == 0
        rest = _stream_all(eng, prompts[1:], 20, stagger=0.02)
        for ids, got in zip(prompts, first + rest, strict=True):
            assert got == _hf(eng._model, ids, 20)
        queried = sum(len(p) for p in prompts)
        assert metrics.prefix_queries._value.get() == queried
        assert metrics.prefix_hits._value.get() >= 3 * 16  # every later prompt reused the 2 system blocks
        # a whole earlier turn + its reply as the next prompt: the cache holds all but the last block of it
        turn2 = prompts[0] + first[0] + tok(" and then?")["input_ids"]
        hits = metrics.prefix_hits._value.get()
        assert _stream_all(eng, [turn2], 6)[0] == _hf(eng._model, turn2, 6)
        assert metrics.prefix_hits._value.get() - hits >= (len(prompts[0]) + 20) // 8 * 8 - 8
        stats = eng.load_stats()
        assert stats["free_blocks"] == stats["total_blocks"] and stats["running"] == 0
    finally:
        eng.shutdown()


def test_preemption_recomputes_and_matches_generate(tiny_model: Path):
    """A cache of 12 blocks of 8 tokens (96 tokens) and 4 sequences that grow to 40 tokens each (160): blocks run
    out mid-decode, the newest sequences are preempted and recomputed, and every stream still equals HF generate
    token for token; the preemptions are counted and every block comes back."""
    from serving.metrics import EngineMetrics

    metrics = EngineMetrics("tiny")
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=96, max_num_seqs=4, block_size=8,
                                              kv_cache_tokens=96, warmup=False), stats=metrics)
    eng.load_and_start()
    try:
        prompts = [eng.tokenizer(p)["input_ids"] for p in PROMPTS[:4]]
        got = _stream_all(eng, prompts, 34)
        for ids, toks in zip(prompts, got, strict=True):
            assert toks == _hf(eng._model, ids, 34)
        assert eng.sched.num_preemptions > 0
        assert metrics.preemptions._value.get() == eng.sched.num_preemptions
        stats = eng.load_stats()
        assert stats["free_blocks"] == stats["total_blocks"] == 12 and stats["waiting"] == 0
    finally:
        eng.shutdown()


def _all_at_once(eng: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Every request queued before the engine's loop starts, so its first step sees all of them (the schedule,
    hence the preemption count, does not depend on thread timing)."""
    async def run() -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        streams = [eng.submit(ids, params) for ids in prompts]
        eng.start()
        return [[t for o in [o async for o in s] for t in o.token_ids] for s in streams]

    return asyncio.run(run())


def test_lookahead_admission_preempts_less_and_both_policies_match_generate(tiny_model: Path):
    """A cache of 12 blocks of 8 and 6 requests at once that grow to ~46 tokens each (36 blocks): admitting on the
    prompt alone (admission_lookahead_tokens=0, victim newest: the first paged engine) preempts over and over; the
    default policy keeps blocks back for the running sequences' next tokens and preempts less. Greedy fp32 tokens
    equal HF generate under both, through every preemption and recompute."""
    counts, refs = {}, None
    for name, opts in {"old": {"admission_lookahead_tokens": 0, "preemption_victim": "newest"}, "new": {}}.items():
        eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=96, max_num_seqs=6, block_size=8,
                                                  kv_cache_tokens=96, warmup=False, **opts))
        eng.load()
        try:
            prompts = [eng.tokenizer(p)["input_ids"] for p in PROMPTS]
            got = _all_at_once(eng, prompts, 40)
            refs = refs or [_hf(eng._model, ids, 40) for ids in prompts]  # the same weights in both engines
            assert got == refs
            stats = eng.load_stats()
            counts[name] = (stats["preemptions"], stats["recomputed_tokens"])
            assert stats["free_blocks"] == stats["total_blocks"] and stats["waiting"] == 0
        finally:
            eng.shutdown()
    assert counts["old"][0] >= 5, counts  # measured: old (10 preemptions, 138 recomputed tokens), new (5, 94)
    assert counts["new"][0] < counts["old"][0] and counts["new"][1] < counts["old"][1], counts


def test_disconnect_frees_blocks_and_impossible_prompt_names_the_cache(tiny_model: Path):
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_num_seqs=2, block_size=8, kv_cache_tokens=256,
                                              warmup=False))
    eng.load_and_start()
    try:
        # max_model_len follows the model (512) but is limited to what the cache holds
        assert eng.info["model_max_len"] == 512 and eng.max_model_len == 256
        ids = eng.tokenizer(PROMPTS[0])["input_ids"]

        async def hang_up() -> int:
            agen = eng.generate(ids, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
            n = 0
            async for o in agen:
                n += len(o.token_ids)
                if n >= 3:
                    break
            await agen.aclose()
            return n

        assert asyncio.run(hang_up()) >= 3
        for _ in range(100):
            stats = eng.load_stats()
            if stats["running"] == 0 and stats["free_blocks"] == stats["total_blocks"]:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert stats["running"] == 0 and stats["free_blocks"] == stats["total_blocks"] == 32
        with pytest.raises(ContextLengthError, match="the KV cache holds 256 tokens"):
            eng.add_request([5] * 240, SamplingParams(max_tokens=20), lambda o: None)
    finally:
        eng.shutdown()


def test_budget_that_cannot_hold_one_sequence_refuses_to_start(tiny_model: Path):
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=256, block_size=8, kv_cache_tokens=64))
    with pytest.raises(EngineError, match="room for 64 cached tokens, less than one sequence of 256"):
        eng.load_and_start()


def _queued_then_started(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Every request queued before the scheduler thread starts: its first step sees them all (no race)."""
    import threading

    left = [len(prompts)]
    done = threading.Event()

    def sink(out) -> None:
        if isinstance(out, BaseException) or out.finish_reason is not None:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    seqs = [eng.add_request(ids, params, sink) for ids in prompts]
    eng.start()
    assert done.wait(60)
    return [s.output_ids for s in seqs]


def test_batched_prefill_of_fresh_prompts_matches_generate_and_the_one_sequence_path(tiny_model: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch):
    """Prompts of 3 to 9 tokens queued at once: one padded forward prefills them (serving.prefill_batch), logits
    and cached K/V as the one-sequence path computes them, and the greedy answers equal HF generate's. A
    ``prefill_chunk`` of 16 padded tokens splits them into groups; an int8 cache keeps the one-sequence path."""
    import serving.engine as se
    from serving.prefill_batch import prefill_fresh

    groups: list[tuple[int, int]] = []  # (rows, longest) of every batched forward
    real = se.prefill_fresh
    monkeypatch.setattr(se, "prefill_fresh", lambda r, p, t: groups.append((len(p), max(map(len, p)))) or real(r, p, t))
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=64, max_num_seqs=6, block_size=8,
                                              enable_prefix_caching=False, warmup=False, prefill_chunk=16))
    try:
        eng.load()
        prompts = [eng.tokenizer(p)["input_ids"] for p in PROMPTS]
        assert len({len(p) for p in prompts}) > 2
        got = _queued_then_started(eng, prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        for ids, toks in zip(prompts, got, strict=True):
            assert toks == _hf(eng._model, ids, 6)
        # batched groups of 2+ rows within 16 padded tokens; the rows that fit no group went one by one
        assert groups and all(n >= 2 and n * longest <= 16 for n, longest in groups), groups
        assert sum(n for n, _ in groups) < len(prompts), groups
        # the same forward against the one-sequence path, directly: logits and every written K/V slot
        r, kv = eng.runner, eng.kv
        for i, ids in enumerate(prompts[:3]):
            kv.admit(f"a{i}", ids)
        tables = [list(kv.tables[f"a{i}"].blocks) for i in range(3)]
        batched = prefill_fresh(r, prompts[:3], tables)
        slots = [r.slot_mapping(t, 0, len(p)) for t, p in zip(tables, prompts[:3], strict=True)]
        flat = lambda c: c.permute(0, 2, 1, 3).reshape(-1, c.shape[1], c.shape[3])  # noqa: E731 - [slot, kvh, hd]
        kb = [flat(r.cache.k[-1])[s].clone() for s in slots]
        for i, (ids, t) in enumerate(zip(prompts[:3], tables, strict=True)):
            one = r.prefill(ids, t, 0, want_logits=True)
            torch.testing.assert_close(batched[i], one, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(flat(r.cache.k[-1])[slots[i]], kb[i], rtol=1e-4, atol=1e-5)
    finally:
        eng.shutdown()
    calls = len(groups)
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=64, max_num_seqs=6, warmup=False,
                                              kv_cache_dtype="int8"))
    try:
        eng.load()
        got = _queued_then_started(eng, prompts[:3], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        assert [len(t) for t in got] == [2, 2, 2] and len(groups) == calls
    finally:
        eng.shutdown()


def test_int8_kv_cache_runs(tiny_model: Path):
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=64, max_num_seqs=2, kv_cache_dtype="int8"))
    eng.load_and_start()
    try:
        got = _generate_all(eng, PROMPTS[:3], max_tokens=6)
        assert [len(t) for t in got] == [6, 6, 6]
        # int8 keys/values: the first token comes from the unquantized prefill attention path of the same math
        assert got[0][0] == _reference(eng._model, eng.tokenizer, PROMPTS[0], 1)[0]
        assert eng.info["kv_cache_dtype"] == "int8"
    finally:
        eng.shutdown()


def test_generic_decode_layer_matches_generate(tiny_model: Path):
    """The module-based decode layer (architectures without the fused pieces, e.g. Qwen3's q/k norms)."""
    import serving.runner

    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=64, max_num_seqs=3, block_size=8))
    eng.load_and_start()
    try:
        assert eng.runner.decode_layer_fn is serving.runner.fused_decode_layer  # a Llama: the pieces by default
        eng.runner.decode_layer_fn = serving.runner.decode_layer
        got = _generate_all(eng, PROMPTS[:3], max_tokens=6)
        for p, toks in zip(PROMPTS[:3], got, strict=True):
            assert toks == _reference(eng._model, eng.tokenizer, p, 6), p
    finally:
        eng.shutdown()


def test_fused_decode_runs_no_residual_add_outside_its_pieces(tiny_model: Path):
    """A decode step of the fused layers: each layer's MLP output joins the residual stream inside the next
    layer's input piece (the last one's inside the final norm's), so no element-wise add runs between the pieces
    (on a GPU: one kernel less per layer, before and inside the CUDA graphs). The recorder sees the generic
    layer's adds, so it can fail."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import serving.runner

    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=64, max_num_seqs=2, block_size=8,
                                              warmup=False))
    eng.load()
    r = eng.runner
    inside = [0]

    def counted(fn):
        def run(*a, **k):
            inside[0] += 1
            try:
                return fn(*a, **k)
            finally:
                inside[0] -= 1
        return run

    class Adds(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.outside = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor) and not inside[0]:
                self.outside += 1
            return func(*args, **(kwargs or {}))

    r.fused = {name: counted(fn) for name, fn in r.fused.items()}
    kv = KVCacheManager(r.cache.num_blocks, 8)
    ids = eng.tokenizer(PROMPTS[0])["input_ids"]
    kv.admit("a", ids + [0])
    blocks = kv.tables["a"].blocks
    r.prefill(ids, blocks, 0, want_logits=False)
    p = len(ids)

    def step() -> tuple[torch.Tensor, int]:
        h = r.embed(torch.tensor([7])).unsqueeze(1)
        tables = torch.zeros(1, eng.max_blocks_per_seq, dtype=torch.int32)
        tables[0, :len(blocks)] = torch.tensor(blocks)
        with torch.inference_mode(), Adds() as rec:
            out = r.decode(h, torch.tensor([p]), torch.tensor([kv.slot("a", p)]), tables,
                           torch.tensor([p + 1], dtype=torch.int32), 64)
        return out, rec.outside

    fused, adds = step()
    assert r.decode_layer_fn is serving.runner.fused_decode_layer and adds == 0
    r.decode_layer_fn = serving.runner.decode_layer
    generic, generic_adds = step()
    assert generic_adds >= len(r.layers)  # the module path's residual adds, seen by the same recorder
    torch.testing.assert_close(fused, generic, atol=1e-5, rtol=1e-5)  # the same logits


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_compiled_decode_layer_aot_eager_backend_matches_eager(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                               kv: str):
    """engine.compile: the element-wise work of a decode layer runs as 5 compiled programs that every layer shares
    (dynamo + AOT autograd here; the "aot_eager" backend skips the C++/Triton build that CUDA gets), and the
    engine decodes token for token as the eager path does."""
    from torch._dynamo.utils import counters

    import serving.runner

    monkeypatch.setattr(serving.runner, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    outs = []
    for compile_ in (False, True):
        eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=64, max_num_seqs=3, kv_cache_dtype=kv,
                                                  compile=compile_))
        eng.load_and_start()
        try:
            outs.append(_generate_all(eng, PROMPTS[:4], max_tokens=6, stagger=0.02))
            assert eng.info["compiled_decode"] is compile_
            layers = len(eng.runner.layers)
        finally:
            eng.shutdown()
    assert outs[0] == outs[1]
    # one program per piece (5) and batch size (1..3), whatever the number of layers: no per-layer recompiles
    assert layers > 1 and 5 <= counters["frames"]["total"] <= 5 * 3 and not counters["graph_break"]


@pytest.mark.parametrize("compile_", [False, True])
def test_fused_projections_decode_as_the_separate_ones_aot_eager_when_compiled(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch, compile_: bool):
    """engine.fuse_projections: q/k/v and gate/up become one linear each (the separate ones are freed), and the
    engine (prefill and decode, eager or compiled pieces) generates what HF generate does."""
    from transformers import AutoModelForCausalLM

    import serving.runner

    monkeypatch.setattr(serving.runner, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=64, max_num_seqs=3, fuse_projections=True,
                                              compile=compile_))
    eng.load_and_start()
    try:
        layers = eng.runner.layers
        assert eng.info["fused_projections"] == {"qkv": len(layers), "gate_up": len(layers)}
        assert all(layer.self_attn.q_proj is None and layer.mlp.up_proj is None for layer in layers)
        got = _generate_all(eng, PROMPTS[:3], max_tokens=6, stagger=0.02)
        ref_model = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
        for p, toks in zip(PROMPTS[:3], got, strict=True):
            assert toks == _reference(ref_model, eng.tokenizer, p, 6), p
    finally:
        eng.shutdown()


def test_fusing_out_of_memory_keeps_the_rest_separate_and_decodes_the_same(tiny_model: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    """A concatenation the device cannot hold (the H200 at a 4 GiB cap with a fragmented allocator) stops the
    fusing: the layers fused so far stay fused, the rest keep their projections, the load succeeds and the
    tokens are HF generate's. The CPU has no device memory to exhaust, so a patched ``fuse_linears`` raises
    torch's out-of-memory error at the third group; the real fusion runs for the first two."""
    from transformers import AutoModelForCausalLM

    import serving.runner

    real, calls = serving.runner.fuse_linears, []

    def fuse_until_oom(mods):
        calls.append(len(mods))
        if len(calls) > 2:  # layer 0's two groups fuse, layer 1's q/k/v does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 44.00 MiB")
        return real(mods)

    monkeypatch.setattr(serving.runner, "fuse_linears", fuse_until_oom)
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=64, max_num_seqs=3, fuse_projections=True))
    eng.load_and_start()
    try:
        layers = eng.runner.layers
        assert len(layers) == 2 and len(calls) == 3
        assert eng.info["fused_projections"] == {"qkv": 1, "gate_up": 1}
        assert layers[0].self_attn.q_proj is None and layers[0].mlp.up_proj is None
        assert layers[1].self_attn.q_proj is not None and layers[1].mlp.up_proj is not None
        got = _generate_all(eng, PROMPTS[:2], max_tokens=6)
        ref_model = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
        for p, toks in zip(PROMPTS[:2], got, strict=True):
            assert toks == _reference(ref_model, eng.tokenizer, p, 6), p
    finally:
        eng.shutdown()


def test_fuse_linears_refuses_what_it_cannot_fuse():
    """Mixed input sizes or modules it does not know stay separate (None); a fused linear equals the parts."""
    from serving.model import fuse_linears

    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 6)
    fused = fuse_linears([a, b])
    x = torch.randn(2, 8)
    assert torch.allclose(fused(x), torch.cat([a(x), b(x)], -1))
    assert fuse_linears([a, torch.nn.Linear(6, 4)]) is None
    assert fuse_linears([torch.nn.Identity(), torch.nn.Identity()]) is None


def make_tiny_gptq(out: Path) -> Path:
    """A 2-layer GPTQ 4-bit checkpoint with random packed weights (the shared 7B tool, scaled down)."""
    from conftest import make_tokenizer
    from safetensors.torch import save_file

    tok = make_tokenizer(out)
    h, inter, layers, g = 128, 256, 2, 64
    gen = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {}

    def qlinear(p: str, i: int, o: int) -> None:
        t[f"{p}.qweight"] = torch.randint(-2**31, 2**31 - 1, (i // 8, o), dtype=torch.int32, generator=gen)
        t[f"{p}.qzeros"] = torch.full((i // g, o // 8), 0x77777777, dtype=torch.int32)
        t[f"{p}.scales"] = torch.full((i // g, o), 0.02, dtype=torch.float16)
        t[f"{p}.g_idx"] = torch.arange(i, dtype=torch.int32) // g

    v = len(tok)
    t["model.embed_tokens.weight"] = (torch.randn(v, h, generator=gen) * 0.5).half()
    t["lm_head.weight"] = (torch.randn(v, h, generator=gen) * 0.5).half()
    t["model.norm.weight"] = torch.ones(h).half()
    for n in range(layers):
        p = f"model.layers.{n}"
        for name, o in (("q_proj", h), ("k_proj", h // 2), ("v_proj", h // 2), ("o_proj", h)):
            qlinear(f"{p}.self_attn.{name}", h, o)
        for name, (i, o) in {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}.items():
            qlinear(f"{p}.mlp.{name}", i, o)
        t[f"{p}.input_layernorm.weight"] = torch.ones(h).half()
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(h).half()
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    q = {"bits": 4, "group_size": g, "desc_act": False, "sym": True, "quant_method": "gptq",
         "checkpoint_format": "gptq"}
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": v,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "torch_dtype": "float16",
           "tie_word_embeddings": False, "quantization_config": q}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "quantize_config.json").write_text(json.dumps(q))
    return out


@pytest.mark.slow
def test_gptq_checkpoint_through_gptqmodel_torch_kernel(tmp_path: Path):
    path = make_tiny_gptq(tmp_path / "tiny-gptq")
    eng = LLMEngine(path, EngineOptions(device="cpu", max_model_len=64, max_num_seqs=4))
    eng.load_and_start()
    try:
        assert eng.info["gptq"]
        linear = eng._model.model.layers[0].self_attn.q_proj
        assert "QuantLinear" in type(linear).__mro__[1].__name__ or hasattr(linear, "qweight")
        got = _generate_all(eng, PROMPTS[:3], max_tokens=6)
        ref = [_reference(eng._model, eng.tokenizer, p, 6) for p in PROMPTS[:3]]
        # bf16 on CPU: allow a late divergence on near-ties, but the first tokens must agree
        assert [g[:2] for g in got] == [r[:2] for r in ref]
    finally:
        eng.shutdown()


def test_config_validation(tmp_path: Path, tiny_model: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  gpu_memory_gbs: 4\n")
    with pytest.raises(ConfigError, match="engine.gpu_memory_gbs"):
        load_serve_config(str(bad), model=str(tiny_model))
    with pytest.raises(ConfigError, match="model"):
        load_serve_config(None, ["port=8001"])
    cfg = load_serve_config("serving/configs/gptq-4gb.yaml", ["engine.max_num_seqs=4"], model=str(tiny_model))
    assert cfg.engine.gpu_memory_gb == 4 and cfg.engine.max_num_seqs == 4 and cfg.port == 8000
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "manifest.json").write_text(json.dumps({"outputs": {"model": str(tiny_model)}}))
    assert resolve_model_path(stage) == tiny_model
    assert ServeConfig(model=str(stage)).model_name == "stage"
    with pytest.raises(ConfigError, match="not a model folder"):
        resolve_model_path(tmp_path)


def test_bench_cli_runs_every_phase_and_counts_tokens(tiny_model: Path, tmp_path: Path):
    """`python -m serving.bench` on CPU: the engine (its compiled phase with the aot_eager backend in place of
    inductor), both generate phases and the profile run in their own processes, count exactly the tokens asked
    for, and the summary compares them (speed itself is a GPU benchmark, not a test)."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "serving.bench", "--model", str(tiny_model), "--device", "cpu",
                    "--batch-sizes", "1,3", "--prompt-len", "8", "--gen-len", "5", "--max-model-len", "64",
                    "--phases", "engine,engine_compiled,generate,generate_uncapped,profile", "--out", str(out)],
                   check=True, capture_output=True, timeout=600,
                   env={**os.environ, "SERVING_COMPILE_BACKEND": "aot_eager"})
    rep = json.loads(out.read_text())
    for phase in ("engine", "engine_compiled"):
        runs = {r["batch"]: r for r in rep[phase]["runs"]}
        assert set(runs) == {1, 3} and all(runs[b]["tokens"] == b * 5 for b in runs)
    assert rep["engine_compiled"]["engine"]["compiled_decode"] is True
    assert rep["engine"]["engine"]["compiled_decode"] is False
    for phase in ("generate", "generate_uncapped"):
        assert [(r["batch"], r["tokens"]) for r in rep[phase]["runs"]] == [(1, 5), (3, 15)]
    s = rep["summary"]
    assert s["max_concurrency"] == 3 and s["best_aggregate_batch"] in (1, 3)
    prof = rep["profile"]  # CPU: operators by kind; their times add up to the step's busy time
    assert prof["steps"] == 10 and prof["kernels_per_step"] > 10 and prof["top"]
    assert abs(sum(g["ms_per_step"] for g in prof["groups"].values()) - prof["busy_ms_per_step"]) < 0.01
    assert 0 < prof["busy_ms_per_step"] <= prof["wall_ms_per_step"] * 1.05
    assert sorted(prof["by_batch"]) == ["1", "3"] and prof["by_batch"]["3"]["batch"] == 3  # each --batch-sizes
    assert prof["by_batch"]["1"]["busy_ms_per_step"] == prof["busy_ms_per_step"] and "bubble_ms" not in prof  # CPU
    assert s["compiled_batch1_speedup"] == round(s["compiled_batch1_decode_tok_s"] / s["batch1_decode_tok_s"], 2)
    assert s["speedup_vs_generate_uncapped"] == round(s["best_aggregate_tok_s"] /
                                                      rep["generate_uncapped"]["best_aggregate_tok_s"], 2)


def test_bench_chat_phases_count_the_prefix_cache_hits_of_each_turn(tiny_model: Path, tmp_path: Path):
    """`python -m serving.bench --phases chat,chat_no_prefix --chat-system N` on CPU: every turn streams its
    tokens; with prefix caching each turn after the first starts from cached full blocks of the history (the
    engine's own hit count, measured at admission), without it none; the summary pairs the turns' TTFTs and
    gives each turn's uncached share, the floor of its TTFT ratio (speed itself is a GPU benchmark)."""
    import subprocess
    import sys

    out = tmp_path / "chat.json"
    subprocess.run([sys.executable, "-m", "serving.bench", "--model", str(tiny_model), "--device", "cpu",
                    "--batch-sizes", "1", "--paged-chat-len", "160", "--turns", "3", "--turn-gen", "4",
                    "--chat-system", "24", "--phases", "chat,chat_no_prefix", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    rep = json.loads(out.read_text())
    chat, nochat = rep["chat"], rep["chat_no_prefix"]
    assert chat["system_tokens"] == 24 and chat["prefix_caching"] and not nochat["prefix_caching"]
    assert [t["tokens"] for t in chat["turns"]] == [4, 4, 4] == [t["tokens"] for t in nochat["turns"]]
    prompts = [t["prompt_tokens"] for t in chat["turns"]]
    assert prompts == [t["prompt_tokens"] for t in nochat["turns"]] and prompts[0] > 24
    cached = [t["cached_tokens"] for t in chat["turns"]]
    # at least the previous prompt's full blocks, never the turn's new message
    assert cached[0] == 0 and all(c % 16 == 0 and prompts[i - 1] // 16 * 16 <= c <= prompts[i - 1] + 4
                                  for i, c in enumerate(cached[1:], 1)), (prompts, cached)
    assert all(t["cached_tokens"] == 0 for t in nochat["turns"])
    ratio = rep["summary_paged"]["chat_ttft_ratio_turn2_on"]
    assert ratio["system_tokens"] == 24 and len(ratio["all"]) == 2
    assert ratio["uncached_share"] == [round(1 - c / n, 3) for c, n in zip(cached[1:], prompts[1:], strict=True)]


@pytest.mark.parametrize("q, cuda_backend", [({"bits": 4, "sym": True}, "marlin"), ({"bits": 8, "sym": True}, "marlin"),
                                            ({"bits": 4, "sym": False}, "exllama_v2"),
                                            ({"bits": 3, "sym": True}, "triton")])
def test_auto_gptq_backend_follows_the_checkpoint(tmp_path: Path, q: dict, cuda_backend: str):
    """Marlin (GPTQ) takes symmetric 4/8-bit only: an asymmetric checkpoint must not be sent to it."""
    from serving.model import auto_gptq_backend

    (tmp_path / "quantize_config.json").write_text(json.dumps({**q, "group_size": 128, "quant_method": "gptq"}))
    assert auto_gptq_backend(tmp_path, torch.device("cuda")) == cuda_backend
    assert auto_gptq_backend(tmp_path, torch.device("cpu")) == "torch"


def test_padded_graph_rows_do_not_touch_real_rows(tiny_model: Path):
    """What a CUDA graph bucket does with rows beyond the batch (block 0, one position): the real rows' logits and
    cache contents are those of the unpadded step (the decode forward on CPU, the graphs' inputs by hand)."""
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=64, block_size=8, kv_cache_tokens=64,
                                              warmup=False))
    eng.load()
    r, kv = eng.runner, KVCacheManager(eng.runner.cache.num_blocks, 8)
    ids = eng.tokenizer(PROMPTS[1])["input_ids"]
    kv.admit("a", ids + [0])
    blocks = kv.tables["a"].blocks
    assert 0 not in blocks
    r.prefill(ids, blocks, 0, want_logits=False)
    p = len(ids)

    def step(rows: int) -> torch.Tensor:
        h = r.embed(torch.tensor([7] * rows)).unsqueeze(1)
        tables = torch.zeros(rows, eng.max_blocks_per_seq, dtype=torch.int32)
        tables[0, :len(blocks)] = torch.tensor(blocks)
        pos = torch.tensor([p] + [0] * (rows - 1))
        slots = torch.tensor([kv.slot("a", p)] + [0] * (rows - 1))
        lens = torch.tensor([p + 1] + [1] * (rows - 1), dtype=torch.int32)
        with torch.inference_mode():
            return r.decode(h, pos, slots, tables, lens, 64)

    alone = step(1)
    k_before = [t[blocks].clone() for t in r.cache.k]
    padded = step(4)
    assert torch.allclose(alone[0], padded[0], atol=1e-6)
    # (position p is written again by the padded step: the same token, a GEMM of another batch size)
    assert all(torch.allclose(a, t[blocks], atol=1e-6) for a, t in zip(k_before, r.cache.k, strict=True))
    assert all(t[0].abs().sum() > 0 for t in r.cache.k)  # the padded rows wrote into block 0


def test_no_environment_set_at_import_and_nvml_absent_is_none():
    import subprocess
    import sys

    code = ("import os; import serving.engine, serving.app, serving.runner, serving.bench; "
            "print(os.environ.get('PYTORCH_ALLOC_CONF'), os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["None", "None"]
    from serving.memory import MemoryReport, process_gpu_mib

    mib, _ = process_gpu_mib(0)  # no GPU here: not listed, no exception
    assert mib is None and MemoryReport().to_dict()["kv_cache"] == 0


def test_host_modules_stay_in_host_memory_never_when_tied_meta_device_standing_in_for_cuda(tiny_model: Path,
                                                                                          tmp_path: Path):
    """The embedding and a re-quantized lm_head are loaded in host memory (their fp16 copies on the device made the
    4 GB replica's peak); a tied pair stays whole. Placement is checked on the meta device, which stands in for
    CUDA here (no GPU in CI)."""
    from transformers import AutoModelForCausalLM

    from serving.model import _to_device_except, host_module_names

    cfg = json.loads((tiny_model / "config.json").read_text())
    assert not cfg.get("tie_word_embeddings")
    assert host_module_names(tiny_model, True, True) == ("model.embed_tokens", "lm_head")
    assert host_module_names(tiny_model, False, True) == ("lm_head",)
    tied = tmp_path / "tied"
    tied.mkdir()
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    assert host_module_names(tied, True, True) == ()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    _to_device_except(model, torch.device("meta"), ("model.embed_tokens", "lm_head"))
    devs = {n: p.device.type for n, p in model.named_parameters()}
    assert devs["model.embed_tokens.weight"] == "cpu" and devs["lm_head.weight"] == "cpu"
    assert {d for n, d in devs.items() if not n.startswith(("model.embed_tokens", "lm_head"))} == {"meta"}
    assert {b.device.type for _, b in model.named_buffers()} == {"meta"}  # rotary inv_freq too


def test_gptq_host_placement_with_a_recorder_for_gptqmodel_load_no_gpu(tmp_path: Path, monkeypatch):
    """GPTQModel.load replaced by a recorder (no GPU here): with host modules it is asked for a device_map that
    keeps them on the CPU; if that load fails the replica loads the plain way (a higher peak, a warning)."""
    import gptqmodel

    from serving import model as model_mod

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "sym": True}))
    calls: list[dict] = []

    class Loaded:
        model = torch.nn.Linear(2, 2)

    def fake_load(path, **kw):
        calls.append(kw)
        if "device_map" in kw and len(calls) == 1 and fail:
            raise RuntimeError("no accelerate")
        return Loaded()

    moved: list[tuple] = []  # a device_map load leaves what the checkpoint lacks (rotary inv_freq) on the CPU
    monkeypatch.setattr(gptqmodel.GPTQModel, "load", staticmethod(fake_load))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(model_mod, "_to_device_except", lambda m, d, h: moved.append((m, str(d), h)) or m)
    fail = False
    model_mod.load_model(tmp_path, torch.device("cuda", 0), gptq_backend="torch",
                         host_modules=("model.embed_tokens", "lm_head"))
    assert calls[-1]["device_map"] == {"": "cuda:0", "model.embed_tokens": "cpu", "lm_head": "cpu"}
    assert "device" not in calls[-1]
    assert moved == [(Loaded.model, "cuda:0", ("model.embed_tokens", "lm_head"))]
    calls.clear()
    fail = True
    model_mod.load_model(tmp_path, torch.device("cuda", 0), gptq_backend="torch", host_modules=("lm_head",))
    assert "device_map" in calls[0] and calls[1]["device"] == "cuda:0" and "device_map" not in calls[1]



def test_graph_buckets_capped_by_batch_tokens_only_for_the_torch_attention_path():
    """The torch attention path gathers batch x context K/V into the graph pool, so its buckets are capped; the
    Triton decode kernel reads blocks in place, so every (batch, context) bucket is captured (the cap had left
    the 4 GB profile's batch-4 steps past 256 tokens of context eager on the H200)."""
    from types import SimpleNamespace

    from serving.runner import DecodeGraphs

    def graphs(kernel):
        runner = SimpleNamespace(hidden=8, dtype=torch.float32, device=torch.device("cpu"), decode_kernel=kernel,
                                 embed_on_host=False)
        return DecodeGraphs(runner, [1, 2, 4], [64, 256, 512, 768], max_blocks=48, max_batch_tokens=1504)

    torch_path, triton_path = graphs(None), graphs(lambda *a: None)
    assert torch_path.wanted(1, 768) and torch_path.wanted(4, 256) and not torch_path.wanted(4, 512)
    assert all(triton_path.wanted(b, c) for b in (1, 2, 4) for c in (64, 256, 512, 768))
