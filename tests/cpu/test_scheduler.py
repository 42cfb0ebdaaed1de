"""The scheduler's admission and preemption policy under a tight KV cache, driven step by step without a model: the
real ``Scheduler`` over the real ``KVCacheManager``, with the forward replaced by bookkeeping (a prefill chunk
marks its tokens computed, a decode step appends one token), as ``LLMEngine._step`` does around its forwards.
Token-exactness through preemption is tested with the real engine in test_serving_engine.py."""

from __future__ import annotations

import random

import pytest

from serving.config import EngineConfig
from serving.kv_cache import KVCacheManager
from serving.sampler import SamplingParams
from serving.scheduler import Scheduler, Sequence

OLD = {"admission_lookahead": 0, "preemption_victim": "newest"}  # the first paged engine's policy
NEW = {"admission_lookahead": EngineConfig().admission_lookahead_tokens,
       "preemption_victim": EngineConfig().preemption_victim}


def _scheduler(blocks: int, block_size: int, policy: dict, max_num_seqs: int = 16) -> Scheduler:
    kv = KVCacheManager(num_blocks=blocks + 1, block_size=block_size, enable_prefix_caching=True)
    return Scheduler(kv, max_num_seqs, max_prefill_tokens=4096, prefill_chunk=64, **policy)


def _seq(i: int, prompt: list[int], max_tokens: int) -> Sequence:
    return Sequence(f"s{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), lambda o: None)


def _drive(sched: Scheduler, arrivals: dict[int, list[Sequence]], max_steps: int = 20_000) -> dict[str, int]:
    """Run engine steps until every sequence finished; returns the step each finished at. Each produced token is
    a function of the sequence and its position, so a recompute that lost or duplicated a token shows up."""
    finished: dict[str, int] = {}
    total = sum(len(v) for v in arrivals.values())
    for step in range(max_steps):
        for seq in arrivals.get(step, ()):
            sched.add(seq)
        sched.admit()
        for ch in sched.prefill_chunks():
            seq = ch.seq
            seq.num_computed = ch.end
            sched.after_tokens(seq)
            if ch.last:
                seq.prefilled = True
                if seq.sample_after_prefill:
                    _append(sched, seq, finished, step)
        for seq in sched.schedule_decode():
            seq.num_computed += 1
            sched.after_tokens(seq)
            _append(sched, seq, finished, step)
        _check_blocks(sched)
        if len(finished) == total:
            return finished
    raise AssertionError(f"{total - len(finished)} of {total} requests never finished in {max_steps} steps")


def _append(sched: Scheduler, seq: Sequence, finished: dict[str, int], step: int) -> None:
    seq.output_ids.append(hash((seq.id, len(seq.output_ids))) % 1000)
    if len(seq.output_ids) >= seq.params.max_tokens:
        assert seq.output_ids == [hash((seq.id, k)) % 1000 for k in range(seq.params.max_tokens)]
        sched.remove(seq)
        finished[seq.id] = step


def _check_blocks(sched: Scheduler) -> None:
    kv = sched.kv
    for s in sched.running:  # every running sequence holds the blocks for what it has computed
        assert len(kv.tables[s.id].blocks) >= kv.blocks_for(max(s.num_computed, len(s.compute_ids)))
    assert set(kv.tables) == {s.id for s in sched.running}


def _mixed_load(n: int, seed: int, max_prompt: int, max_tokens: int) -> list[tuple[list[int], int]]:
    """Varied prompt lengths (log-normal-ish: many short, a few long) and max_tokens, all at once."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = min(max_prompt, max(2, int(rng.lognormvariate(3.0, 0.8))))
        out.append(([rng.randrange(1000) for _ in range(length)], rng.randint(8, max_tokens)))
    return out


def _run(policy: dict, load: list[tuple[list[int], int]], blocks: int, bs: int) -> tuple[Scheduler, dict[str, int]]:
    sched = _scheduler(blocks, bs, policy)
    done = _drive(sched, {0: [_seq(i, list(p), mt) for i, (p, mt) in enumerate(load)]})
    assert sched.kv.pool.num_free == sched.kv.pool.usable and not sched.running and not sched.waiting
    return sched, done


@pytest.mark.parametrize("seed", range(3))
def test_lookahead_admission_preempts_and_recomputes_less_than_prompt_only_admission(seed: int):
    """48 blocks of 16 and 48 requests at once (prompts ~20 tokens median, up to 300; max_tokens 8..128): the
    old policy fills the cache with prompts and thrashes; the new one preempts and recomputes far less, and both
    finish every request."""
    load = _mixed_load(48, seed, max_prompt=300, max_tokens=128)
    old, old_done = _run(OLD, load, blocks=48, bs=16)
    new, new_done = _run(NEW, load, blocks=48, bs=16)
    assert len(old_done) == len(new_done) == 48
    assert old.num_preemptions >= 10, "the workload does not put the old policy under pressure"
    assert new.num_preemptions * 2 <= old.num_preemptions
    assert new.recomputed_tokens * 2 <= old.recomputed_tokens


def test_no_request_starves_behind_a_stream_of_small_ones():
    """A request needing the whole cache (prompt + max_tokens = every block) arrives behind small ones while
    small ones keep arriving every step: first come, first served plus the waived reserve when nothing runs
    means it starts once the earlier ones drain, and the later small ones wait behind it."""
    bs, blocks = 8, 24
    arrivals: dict[int, list[Sequence]] = {0: [_seq(i, [i] * 10, 30) for i in range(6)]}
    arrivals[1] = [_seq(100, list(range(blocks * bs - 16)), 16)]  # 176 + 16 = 192 tokens: the whole cache
    for step in range(2, 200):
        arrivals[step] = [_seq(1000 + step, [step % 7] * 6, 20)]
    sched = _scheduler(blocks, bs, NEW)
    done = _drive(sched, arrivals)
    assert len(done) == 6 + 1 + 198
    # nothing that arrived after the big request finished before it started, so it finished ahead of them all
    later = [v for k, v in done.items() if int(k[1:]) >= 1000]
    assert done["s100"] < min(later)


def test_still_preempts_when_the_running_sequences_outgrow_the_cache():
    """Four short prompts admitted together (their next 16 tokens fit) that then grow to 64 tokens each (32
    blocks of a 16-block cache): the new policy must preempt; every request still finishes with its own tokens
    (``_append`` checks them) and every block comes back."""
    load = [([i + 1] * 8, 56) for i in range(4)]
    sched, done = _run(NEW, load, blocks=16, bs=8)
    assert len(done) == 4
    assert sched.num_preemptions > 0 and sched.recomputed_tokens > 0


def test_least_computed_victim_never_preempts_the_most_advanced_sequence():
    """With ``least_computed`` the victim has the fewest tokens in the cache of all running sequences, so the
    furthest sequence always progresses (why no request can be preempted forever)."""
    load = _mixed_load(32, 7, max_prompt=200, max_tokens=96)
    sched = _scheduler(32, 16, NEW)
    seen: list[tuple[int, int]] = []
    orig = sched.preempt

    def spy(seq: Sequence) -> None:
        seen.append((seq.num_computed, min(s.num_computed for s in sched.running)))
        orig(seq)

    sched.preempt = spy
    done = _drive(sched, {0: [_seq(i, list(p), mt) for i, (p, mt) in enumerate(load)]})
    assert len(done) == 32 and seen, "no preemption happened: the test checks nothing"
    assert all(victim == least for victim, least in seen)


def test_bad_preemption_victim_is_refused():
    with pytest.raises(ValueError, match="preemption_victim"):
        _scheduler(8, 8, {"preemption_victim": "oldest"})
    with pytest.raises(ValueError):
        EngineConfig(preemption_victim="oldest")
    with pytest.raises(ValueError):
        EngineConfig(admission_lookahead_tokens=-1)


def test_bench_scheduler_cli_runs_both_policies_on_the_same_load(tmp_path):
    """`python -m serving.bench_scheduler` at a toy size (in-process): both policies serve every request with the
    same greedy tokens and the JSON carries the counts the README quotes (speed is not checked here)."""
    import json

    from serving.bench_scheduler import main

    out = tmp_path / "sched.json"
    assert main(["--requests", "16", "--kv-blocks", "32", "--block-size", "8", "--median-prompt", "24",
                 "--gen-min", "16", "--gen-max", "48", "--seeds", "0", "--repeats", "1",
                 "--policy", "old=0:newest", "--policy", "new=default", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    old, new = rep["policies"]["old"], rep["policies"]["new"]
    assert (new["admission_lookahead_tokens"], new["preemption_victim"]) == (
        EngineConfig().admission_lookahead_tokens, EngineConfig().preemption_victim)
    for r in (old, new):
        assert r["served"] == 16 and r["failed"] == 0 and r["blocks_back"] and r["outputs_equal_first"] == 16
    assert old["preemptions"] > new["preemptions"]
    assert rep["summary"]["preemptions"] == [old["preemptions"], new["preemptions"]]
