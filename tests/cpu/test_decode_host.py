"""The decode step's host side (serving.decode_inputs, the sampler's SamplePlan and SeededUniforms,
LlamaRunner.decode_packed) against the per-row code it replaced, written out here as the reference: same rows, same
uniforms from the same seeds, same tokens. Speed lives in ``python -m serving.bench_host``, not here."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from serving.decode_inputs import PACKED_COLUMNS, DecodeInputs
from serving.engine import EngineOptions, LLMEngine
from serving.kv_cache import BlockTable, KVCacheManager
from serving.sampler import UNIFORM_BLOCK, SamplePlan, SamplingParams, SeededUniforms, _uniforms, sample


@dataclass
class Seq:
    id: str
    params: SamplingParams
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None
    generator: object | None = None
    num_computed: int = 0


# ------------------------------------------------------------------------------------------ the old per-row code

def old_rows(seqs: list[Seq], tables: dict[str, BlockTable], bs: int, width: int) -> torch.Tensor:
    """The engine's former ``_decode_step`` input build: every row from Python lists, zero-padded tables."""
    rows = []
    for s in seqs:
        blocks = tables[s.id].blocks
        p = s.num_computed
        rows.append([s.output_ids[-1], p, blocks[p // bs] * bs + p % bs, p + 1, *blocks,
                     *itertools.repeat(0, width - len(blocks))])
    return torch.tensor(rows, dtype=torch.long)


def old_uniforms(seqs: list[Seq], gens: dict[str, torch.Generator]) -> torch.Tensor:
    out = []
    for s in seqs:
        p = s.params
        if p.temperature == 0:
            out.append(-1.0)
        elif p.seed is None:
            out.append(float(torch.rand(1, dtype=torch.float64)))
        else:
            g = gens.setdefault(s.id, torch.Generator().manual_seed(p.seed))
            out.append(float(torch.rand(1, dtype=torch.float64, generator=g)))
    return torch.tensor(out, dtype=torch.float64)


def old_sample(logits: torch.Tensor, seqs: list[Seq], gens: dict[str, torch.Generator]) -> list[int]:
    """The former ``sample`` for batches without processors, penalties or logprobs: per-row tensors every call,
    argmax and select always, the clamp always."""
    params = [s.params for s in seqs]
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if all(p.temperature == 0 for p in params):
        return greedy.tolist()
    u = old_uniforms(seqs, gens)
    t = torch.tensor([max(p.temperature, 1e-5) for p in params])[:, None]
    probs = torch.softmax(logits / t, dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params])[:, None]
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    vocab = logits.shape[-1]
    if any(0 < p.top_k < vocab for p in params) or any(p.top_p < 1.0 for p in params):
        ks_list = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        width = max(ks_list)
        sp, si = probs.topk(width, dim=-1) if width < vocab else probs.sort(dim=-1, descending=True)
        sp = sp.masked_fill(torch.arange(width)[None, :] >= torch.tensor(ks_list)[:, None], 0.0)
        if any(p.top_p < 1.0 for p in params):
            cum = sp.cumsum(dim=-1) / sp.sum(dim=-1, keepdim=True)
            top_p = torch.tensor([p.top_p for p in params])[:, None]
            sp = sp.masked_fill(cum - sp / sp.sum(dim=-1, keepdim=True) > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    cdf = probs.double().cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, u.clamp(min=0.0)[:, None] * cdf[:, -1:], right=True)[:, 0].clamp_(max=vocab - 1)
    return torch.where(u < 0, greedy, drawn).tolist()


# ------------------------------------------------------------------------------------------------------ tests

def test_seeded_uniforms_are_the_per_token_generator_stream():
    """Drawing UNIFORM_BLOCK at a time gives the values one torch.rand(1) per token gave, across block borders."""
    g = torch.Generator().manual_seed(77)
    want = [float(torch.rand(1, dtype=torch.float64, generator=g)) for _ in range(3 * UNIFORM_BLOCK + 5)]
    st = SeededUniforms(77)
    assert [st.next() for _ in range(len(want))] == want


def test_uniforms_of_a_mixed_batch_equal_the_per_row_draws_and_use_the_global_stream_alike():
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
             SamplingParams(temperature=0.7, seed=5), SamplingParams(temperature=1.0, seed=9)]
    rng = random.Random(0)
    seqs = [Seq(f"s{i}", kinds[rng.randrange(4)]) for i in range(12)]
    gens: dict[str, torch.Generator] = {}
    torch.manual_seed(1)
    want = [old_uniforms(seqs, gens) for _ in range(UNIFORM_BLOCK + 3)]
    after_old = torch.rand(1)
    torch.manual_seed(1)
    got = [_uniforms(seqs) for _ in range(UNIFORM_BLOCK + 3)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(torch.rand(1), after_old)  # the global generator advanced by as many draws


@pytest.mark.parametrize("seed", range(6))
def test_sample_with_a_plan_equals_the_old_per_row_sampler_on_random_batches(seed: int):
    rng = random.Random(seed)
    vocab = 97
    n = rng.choice([1, 3, 8, 16])
    seqs = []
    for i in range(n):
        p = SamplingParams(temperature=rng.choice([0.0, 1.0, 1.0, 0.6, 1.3]), top_p=rng.choice([1.0, 1.0, 0.8]),
                           top_k=rng.choice([0, 0, 5, 200]), min_p=rng.choice([0.0, 0.0, 0.05]),
                           seed=rng.choice([None, 1000 + i, 1000 + i]))
        seqs.append(Seq(f"s{i}", p))
    if seed == 0:  # the rollouts' case: every row seeded at temperature 1, top_p 1
        seqs = [Seq(f"s{i}", SamplingParams(temperature=1.0, top_p=1.0, seed=50 + i)) for i in range(16)]
    if seed == 1:  # greedy rollouts
        seqs = [Seq(f"s{i}", SamplingParams(temperature=0.0)) for i in range(8)]
    g = torch.Generator().manual_seed(seed)
    gens: dict[str, torch.Generator] = {}
    plan = SamplePlan([s.params for s in seqs])
    for step in range(UNIFORM_BLOCK + 4):
        logits = torch.randn(len(seqs), vocab, generator=g) * 3
        torch.manual_seed(step)
        want = old_sample(logits, seqs, gens)
        torch.manual_seed(step)
        assert sample(logits, seqs, plan)[0] == want, step


def _check(inp: DecodeInputs, seqs: list[Seq], tables: dict[str, BlockTable], bs: int, width: int) -> None:
    longest = inp.fill(seqs, tables)
    n = len(seqs)
    assert torch.equal(inp.host[:n].long(), old_rows(seqs, tables, bs, width))
    pad = torch.zeros(inp.host.shape[0] - n, inp.host.shape[1], dtype=torch.int32)
    pad[:, 3] = 1
    assert torch.equal(inp.host[n:], pad)  # what a graph's spare rows must read: block 0, one position
    assert longest == max(s.num_computed for s in seqs) + 1


def test_persistent_rows_equal_rows_rebuilt_every_step_through_growth_finishes_and_readmission():
    """Random batches over a real KVCacheManager: rows step, open blocks, finish (the rows after them move up),
    new sequences join, one is preempted and admitted again (new blocks, same sequence object)."""
    bs, width, max_rows = 4, 12, 6
    kv = KVCacheManager(200, bs, enable_prefix_caching=False)
    rng = random.Random(3)
    ids = itertools.count()
    inp = DecodeInputs(max_rows, width, bs)

    def new_seq() -> Seq:
        s = Seq(f"s{next(ids)}", SamplingParams(), output_ids=[rng.randrange(50)])
        prompt = rng.randrange(1, 20)
        kv.admit(s.id, [1] * prompt)
        s.num_computed = prompt
        return s

    running = [new_seq() for _ in range(4)]
    for _ in range(120):
        for s in running:
            if kv.append_slot_needed(s.id, s.num_computed):
                kv.grow(s.id)
        _check(inp, running, kv.tables, bs, width)
        for s in running:
            s.num_computed += 1
            s.output_ids.append(rng.randrange(50))
        r = rng.random()
        if r < 0.08 and running:  # a row finishes
            gone = running.pop(rng.randrange(len(running)))
            kv.free(gone.id)
        elif r < 0.16 and len(running) < max_rows:
            running.append(new_seq())
        elif r < 0.2 and running:  # preempted and admitted again at once: same object, a new table
            s = running[rng.randrange(len(running))]
            kv.free(s.id)
            kv.admit(s.id, [1] * s.num_computed)
        if not running:
            running.append(new_seq())
        for s in list(running):
            if s.num_computed + 2 >= width * bs:  # long enough: done
                running.remove(s)
                kv.free(s.id)
        if not running:
            running.append(new_seq())


def test_decode_packed_equals_decode_from_separate_inputs(tiny_model: Path):
    """The packed entry point (what the CUDA graphs capture) gives the logits of the separate-tensor decode."""
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=64, block_size=8, kv_cache_tokens=256,
                                              warmup=False))
    eng.load()
    r, kv = eng.runner, KVCacheManager(eng.runner.cache.num_blocks, 8)
    prompts = [eng.tokenizer(p)["input_ids"] for p in ("Hello, how are", "The capital of France is")]
    seqs = []
    for i, ids in enumerate(prompts):
        kv.admit(f"r{i}", ids + [0])
        r.prefill(ids, kv.tables[f"r{i}"].blocks, 0, want_logits=False)
        seqs.append(Seq(f"r{i}", SamplingParams(), output_ids=[5 + i], num_computed=len(ids)))
    inp = DecodeInputs(4, eng.max_blocks_per_seq, 8)
    inp.fill(seqs, kv.tables)
    rows = old_rows(seqs, kv.tables, 8, eng.max_blocks_per_seq)
    k_before = [t.clone() for t in r.cache.k]
    with torch.inference_mode():
        want = r.decode(r.embed(rows[:, 0]).unsqueeze(1), rows[:, 1].contiguous(), rows[:, 2].contiguous(),
                        rows[:, 4:].to(torch.int32), rows[:, 3].to(torch.int32), 64)
        written = [t.clone() for t in r.cache.k]
        for t, k in zip(r.cache.k, k_before, strict=True):
            t.copy_(k)
        got = r.decode_packed(inp.host[:2], 64)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(written, r.cache.k, strict=True))
    assert inp.host.shape[1] == PACKED_COLUMNS + eng.max_blocks_per_seq


def _count_ahead(eng: LLMEngine) -> list[int]:
    """[steps taken from the step queued ahead, steps computed afresh, of the first: taken for fewer rows]."""
    used = [0, 0, 0]
    take = eng._take_ahead

    def counted(seqs, ctx):
        fewer = eng._ahead is not None and len(eng._ahead[0]) > len(seqs)
        out = take(seqs, ctx)
        used[out is None] += 1
        used[2] += out is not None and fewer
        return out

    eng._take_ahead = counted
    return used


_SEEDED_REFERENCE: dict[str, list[list[int]]] = {}


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_seeded_sampling_follows_the_per_token_generator_stream(tiny_model: Path, overlap: bool):
    """End to end: the engine's seeded tokens are those of a plain loop over the HF model drawing one
    torch.rand(1) per token from a generator seeded alike (inverse CDF over the softmax): the seed stream the
    rollouts had before the uniforms were drawn in blocks; with ``overlap_decode`` too (eager steps queued ahead,
    taken while the batch holds, computed again when a row's end changes it)."""
    import asyncio

    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=128, max_num_seqs=4, warmup=False,
                                              overlap_decode=overlap))
    eng.load_and_start()
    used = _count_ahead(eng)
    try:
        prompts = [eng.tokenizer(p)["input_ids"] for p in ("Hello, how are", "Two plus two", "PPO improves")]
        n_tok = UNIFORM_BLOCK + 6
        lengths = [n_tok, n_tok - 9, n_tok]

        async def go():
            async def one(i, ids):
                params = SamplingParams(max_tokens=lengths[i], temperature=1.0, seed=40 + i, ignore_eos=True,
                                        detokenize=False, final_only=True)
                return [t for o in [o async for o in eng.generate(ids, params)] for t in o.token_ids]
            return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))

        got = asyncio.run(go())
    finally:
        eng.shutdown()
    model = eng._model
    # the plain loop's answers do not depend on ``overlap``: computed once (they are the slow part: no KV cache)
    wants = _SEEDED_REFERENCE.setdefault(str(tiny_model), [])
    if wants:
        for i, want in enumerate(wants):
            assert got[i] == want, i
        assert (used[0] > n_tok - 12) == overlap, used
        return
    for i, ids in enumerate(prompts):
        g = torch.Generator().manual_seed(40 + i)
        seq, want = list(ids), []
        with torch.no_grad():
            for _ in range(lengths[i]):
                logits = model(torch.tensor([seq])).logits[0, -1].float()
                cdf = torch.softmax(logits, -1).double().cumsum(-1)
                u = float(torch.rand(1, dtype=torch.float64, generator=g))
                tok = min(int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64),
                                                 right=True)), logits.shape[-1] - 1)
                want.append(tok)
                seq.append(tok)
        wants.append(want)
        assert got[i] == want, i
    assert (used[0] > n_tok - 12) == overlap, used


class EagerGraph:
    """Stands in for a captured ``torch.cuda.CUDAGraph`` (no CUDA here): ``replay()`` runs what the capture
    records, ``decode_packed`` over the static buffers, into the graph's static output."""

    def __init__(self, graphs, b: int, ctx: int, vocab: int):
        self.graphs, self.b, self.ctx = graphs, b, ctx
        self.out = torch.zeros(b, vocab)

    def replay(self) -> None:
        g = self.graphs
        h = g.h[:self.b] if g.h is not None else None
        self.out.copy_(g.runner.decode_packed(g.packed[:self.b], self.ctx, h))


@pytest.mark.parametrize("overlap", [False, True])
def test_graph_path_with_padded_buckets_matches_generate_graphs_stood_in_by_their_eager_body(tiny_model: Path,
                                                                                           overlap: bool):
    """The engine's CUDA-graph path (static packed buffer, one copy of the bucket's rows, padding from the host
    rows) with each graph replaced by ``EagerGraph``: 3 rows run in the 4-row bucket, then 2, then 1 as they
    finish; every row's greedy tokens equal HF generate's. With ``overlap_decode``: the steps queued ahead are
    taken, also for the rows left (rows 0, 2, 3) when row 1 stopped on a stop token inside the same bucket."""
    import asyncio

    from serving.runner import DecodeGraphs

    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=96, max_num_seqs=4, warmup=False,
                                              overlap_decode=overlap))
    eng.load()
    graphs = DecodeGraphs(eng.runner, [1, 4], eng.ctx_buckets, eng.max_blocks_per_seq)
    for b in graphs.batch_sizes:
        for c in graphs.ctx_sizes:
            g = EagerGraph(graphs, b, c, eng.runner.vocab)
            graphs.graphs[(b, c)] = (g, g.out)
    eng.graphs = graphs
    replays = []
    run = graphs.run
    graphs.run = lambda host, n, ctx, tokens=None: (replays.append((n, graphs.bucket(n, ctx)[0]))
                                                    or run(host, n, ctx, tokens))
    used = _count_ahead(eng)
    prompts = ["Hello, how are", "The capital of France", "Two plus two", "PPO improves"]
    lengths = [20, 20, 9, 14]
    refs = []
    for p, m in zip(prompts, lengths, strict=True):
        ids = torch.tensor([eng.tokenizer(p)["input_ids"]])
        with torch.no_grad():
            refs.append(eng._model.generate(ids, max_new_tokens=m, min_new_tokens=m,
                                            do_sample=False)[0, ids.shape[1]:].tolist())
    # row 1 stops at its 6th token's id (a stop token: where it ends is known only once it is sampled)
    stop = refs[1][5]
    refs[1] = refs[1][:refs[1].index(stop)]
    eng.start()
    try:
        async def go():
            async def one(p, m):
                stops = [stop] if p == prompts[1] else []
                params = SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, stop_token_ids=stops)
                return [t for o in [o async for o in eng.generate(eng.tokenizer(p)["input_ids"], params)]
                        for t in o.token_ids]
            return await asyncio.gather(*(one(p, m) for p, m in zip(prompts, lengths, strict=True)))

        got = asyncio.run(go())
    finally:
        eng.shutdown()
    assert {(4, 4), (3, 4), (2, 4), (1, 1)} <= set(replays), sorted(set(replays))
    for p, toks, want in zip(prompts, got, refs, strict=True):
        assert toks == want, p
    assert (used[0] >= 12) == overlap and (used[2] >= 1) == overlap, used  # row 1's stop: 3 of 4 rows taken
