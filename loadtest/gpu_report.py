"""Helpers of ``loadtest/gpu_sweep.sh``: sweep levels for a server's capacity, the memory-bandwidth limit of
single-stream decoding, and the combined ``summary.json``/``summary.md`` of the project-vs-baseline sweep.

``python -m loadtest.gpu_report levels --max N``                 -> ``1,2,4,...,N``
``python -m loadtest.gpu_report capacity --metrics-url U --log F`` -> the server's most concurrent sequences
``python -m loadtest.gpu_report facts --out DIR --ckpt PATH``     -> DIR/facts.json (weight bytes, copy bandwidth)
``python -m loadtest.gpu_report summary --out DIR``               -> DIR/summary.json, DIR/summary.md
``python -m loadtest.gpu_report tokenizer --ckpt PATH``          -> a tokenizer covering the model's whole vocabulary
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import urllib.request
from pathlib import Path
from typing import Any

from loadtest.report import atomic_write

CAPACITY_METRICS = ("vllm:num_slots", "vllm:max_num_seqs", "colossal_rlhf:num_slots", "vllm:cache_config_info")
LEVEL_KEYS = ("mode", "value", "label", "requests", "successes", "requests_per_s", "output_tokens_per_s")


def levels(max_conc: int) -> list[int]:
    out, c = [], 1
    while c < max_conc:
        out.append(c)
        c *= 2
    return [*out, max_conc]


def capacity_from_metrics(text: str) -> int | None:
    """A capacity gauge's value, or the ``num_slots``/``max_num_seqs`` label of an ``..._info`` gauge."""
    for line in text.splitlines():
        for name in CAPACITY_METRICS:
            if line.startswith(name):
                m = re.search(r'(?:num_slots|max_num_seqs)="(\d+)"', line)
                if m:
                    return int(m.group(1))
                if not name.endswith("_info"):
                    return int(float(line.split()[-1]))
    return None


def capacity(metrics_url: str | None, log: Path | None) -> int | None:
    """Most sequences the server decodes at once: from /metrics, else ``"num_slots": N`` in its log."""
    if metrics_url:
        try:
            found = capacity_from_metrics(urllib.request.urlopen(metrics_url, timeout=10).read().decode())
            if found:
                return found
        except OSError:
            pass
    if log and log.exists():
        found = re.findall(r'"?num_slots"?\s*[:=]\s*(\d+)', log.read_text(errors="replace"))
        if found:
            return int(found[-1])
    return None


def weight_bytes(ckpt: Path) -> dict[str, int]:
    """Bytes of the checkpoint's tensors from the safetensors headers: all, and without the embedding table
    (which the serving engine keeps in host memory under a GPU budget)."""
    total = embed = 0
    for f in sorted(ckpt.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            size = t["data_offsets"][1] - t["data_offsets"][0]
            total += size
            if "embed_tokens" in name:
                embed += size
    return {"all": total, "without_embedding": total - embed}


def copy_bandwidth(gib: float = 2.0, iters: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting the read and the write (the same way as
    ``shared/docs/environment.md``'s 2,648 GB/s on the H100)."""
    import torch

    n = int(gib * 2**30)
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    secs = start.elapsed_time(end) / 1e3
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * iters / secs


def full_vocab_tokenizer(ckpt: Path) -> int:
    """Replace the checkpoint's tokenizer with a word-level one covering all ``vocab_size`` ids.

    ``make_llama7b_gptq.py`` ships a 300-token tokenizer for a 32,000-id model: the ids a random model samples
    mostly decode to nothing, so a server streams empty deltas and the client sees no token arrive. With one
    word per id every sampled token is visible text, and each word of a synthetic prompt is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from loadtest.prompts import _WORDS

    vocab_size = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    words = ["<unk>", "<s>", "</s>", *dict.fromkeys(_WORDS)]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words[:vocab_size])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (ckpt / f).unlink(missing_ok=True)
    tok.save_pretrained(ckpt)
    return len(tok)


def peak_mib(csv_path: Path) -> float | None:
    """Highest ``memory.used`` (MiB) in an ``nvidia-smi --query-gpu=memory.used -lms`` log (first GPU)."""
    if not csv_path.exists():
        return None
    vals = []
    for line in csv_path.read_text().splitlines():
        try:
            vals.append(float(line.split(",")[0]))
        except ValueError:
            continue
    return max(vals) if vals else None


def _load(p: Path) -> dict[str, Any] | None:
    return json.loads(p.read_text()) if p.exists() else None


def facts(out: Path, ckpt: Path, measure_bandwidth: bool) -> dict[str, Any]:
    """Write ``facts.json`` (weight bytes, copy bandwidth) so a summary can be redone without the GPU or the
    checkpoint (e.g. here, from the folders brought back)."""
    f: dict[str, Any] = _load(out / "facts.json") or {}
    if ckpt.exists():
        f["checkpoint"], f["weight_bytes"] = str(ckpt), weight_bytes(ckpt)
    if measure_bandwidth and not f.get("copy_bandwidth_bytes_per_s"):
        import torch

        if torch.cuda.is_available():
            f["copy_bandwidth_bytes_per_s"] = copy_bandwidth()
            f["device"] = torch.cuda.get_device_name()
    atomic_write(out / "facts.json", json.dumps(f, indent=2) + "\n")
    return f


def engine_info(log: Path) -> dict[str, Any]:
    """The serving engine's ``engine loaded {...}`` log record (slots, KV cache, weights on the GPU...)."""
    if not log.exists():
        return {}
    found = re.findall(r"engine loaded (\{.*\})", log.read_text(errors="replace"))
    try:
        return json.loads(found[-1]) if found else {}
    except ValueError:
        return {}


def summary(out: Path) -> dict[str, Any]:
    f = _load(out / "facts.json") or {}
    wb, bandwidth = f.get("weight_bytes"), f.get("copy_bandwidth_bytes_per_s")
    runs = {name: _load(out / name / "results.json") for name in ("project", "baseline")}
    engine = engine_info(out / "project_server.log")
    if wb and engine.get("weights_bytes_on_gpu"):
        wb = {**wb, "engine_on_gpu": int(engine["weights_bytes_on_gpu"])}  # what the engine says it placed
    res: dict[str, Any] = {"checkpoint": f.get("checkpoint"), "device": f.get("device"), "weight_bytes": wb,
                           "copy_bandwidth_bytes_per_s": bandwidth, "engine": engine or None, "runs": {}}
    for name, r in runs.items():
        if r is None:
            res["runs"][name] = None
            continue
        by_c = {int(lv["value"]): lv for lv in r["levels"] if lv["mode"] == "concurrency"}
        single = by_c.get(1)
        row: dict[str, Any] = {
            "peak_gpu_memory_mib": peak_mib(out / f"{name}_gpu_mem.csv"),
            "best": r["summary"]["best"], "peak_output_tokens_per_s": r["summary"]["peak_output_tokens_per_s"],
            "server_counts_agree": r["summary"].get("server_counts_agree"),
            "levels": [{k: lv[k] for k in LEVEL_KEYS}
                       | {"ttft_p50": lv["ttft"]["p50"], "ttft_p95": lv["ttft"]["p95"], "ttft_p99": lv["ttft"]["p99"],
                          "itl_p50": lv["itl"]["p50"], "itl_p95": lv["itl"]["p95"], "itl_p99": lv["itl"]["p99"],
                          "e2e_p50": lv["e2e"]["p50"], "e2e_p99": lv["e2e"]["p99"], "slo_met": lv["slo"]["met"],
                          "errors": lv["errors"]} for lv in r["levels"]],
        }
        if single and single["tpot"]["p50"]:
            decode = 1.0 / single["tpot"]["p50"]
            row["single_stream_decode_tokens_per_s"] = decode
            if bandwidth and wb:
                for key, nbytes in wb.items():
                    limit = bandwidth / nbytes
                    row[f"bandwidth_limit_tokens_per_s_{key}"] = limit
                    row[f"fraction_of_limit_{key}"] = decode / limit
        res["runs"][name] = row
    atomic_write(out / "summary.json", json.dumps(res, indent=2) + "\n")
    atomic_write(out / "summary.md", markdown(res))
    return res


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def markdown(res: dict[str, Any]) -> str:
    lines = ["# GPU sweep: project server vs transformers `generate` baseline", ""]
    wb, bw = res.get("weight_bytes"), res.get("copy_bandwidth_bytes_per_s")
    if wb:
        lines.append(f"Checkpoint `{res['checkpoint']}`: {wb['all'] / 2**30:.2f} GiB of tensors "
                     f"({wb['without_embedding'] / 2**30:.2f} GiB without the embedding table"
                     + (f"; the engine placed {wb['engine_on_gpu'] / 2**30:.2f} GiB on the GPU" if "engine_on_gpu" in wb
                        else "") + ").")
    if res.get("engine"):
        e = res["engine"]
        lines.append(f"Project engine: {e.get('num_slots')} slots of {e.get('max_model_len')} tokens, KV cache "
                     f"{(e.get('kv_cache_bytes') or 0) / 2**20:.0f} MiB ({e.get('kv_cache_dtype')}), budget "
                     + (f"{e['gpu_memory_budget_bytes'] / 2**30:.2f} GiB" if e.get("gpu_memory_budget_bytes")
                        else "none") + f", loaded in {e.get('load_s')} s.")
    if bw:
        lines.append(f"Device copy bandwidth (read + write) on {res.get('device')}: {bw / 1e9:.0f} GB/s.")
    lines.append("")
    for name, row in res["runs"].items():
        if row is None:
            lines += [f"## {name}: no results", ""]
            continue
        lines += [f"## {name}", ""]
        mem = row["peak_gpu_memory_mib"]
        budget = (res.get("engine") or {}).get("gpu_memory_budget_bytes") if name == "project" else None
        fit = "" if mem is None or not budget else (
            f" ({'within' if mem <= budget / 2**20 else 'OVER'} the {budget / 2**20:.0f} MiB budget; nvidia-smi "
            "counts the CUDA context too)")
        lines.append(f"- Peak GPU memory (nvidia-smi, whole GPU): {mem:.0f} MiB{fit}" if mem is not None
                     else "- Peak GPU memory: -")
        for mode, b in row["best"].items():
            lines.append(f"- Highest {mode} level meeting the SLOs: "
                         + ("none" if b is None else f"{b['label']} ({b['requests_per_s']:.2f} req/s, "
                                                     f"{b['output_tokens_per_s']:.0f} output tok/s)"))
        if "single_stream_decode_tokens_per_s" in row:
            s = f"- Single-stream decode: {row['single_stream_decode_tokens_per_s']:.1f} tok/s"
            if "fraction_of_limit_engine_on_gpu" in row:
                s += (f" = {100 * row['fraction_of_limit_engine_on_gpu']:.1f}% of the bandwidth limit "
                      f"({row['bandwidth_limit_tokens_per_s_engine_on_gpu']:.0f} tok/s reading the weights the "
                      f"engine placed on the GPU once per token)")
            elif "fraction_of_limit_without_embedding" in row:
                s += (f" = {100 * row['fraction_of_limit_without_embedding']:.1f}% of the bandwidth limit "
                      f"({row['bandwidth_limit_tokens_per_s_without_embedding']:.0f} tok/s reading the weights "
                      f"without the embedding once per token; "
                      f"{100 * row['fraction_of_limit_all']:.1f}% counting all tensors)")
            lines.append(s)
        lines.append(f"- Server /metrics counts agree with the client: {row['server_counts_agree']}")
        lines += ["", "| level | req | ok | req/s | out tok/s | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | "
                      "E2E p50/p99 ms | SLO | errors |", "|---:|---:|---:|---:|---:|---|---|---|---|---|"]
        for lv in row["levels"]:
            lines.append(f"| {lv['label']} | {lv['requests']} | {lv['successes']} | {lv['requests_per_s']:.2f} | "
                         f"{lv['output_tokens_per_s']:.1f} | {_ms(lv['ttft_p50'])}/{_ms(lv['ttft_p95'])}/"
                         f"{_ms(lv['ttft_p99'])} | {_ms(lv['itl_p50'])}/{_ms(lv['itl_p95'])}/{_ms(lv['itl_p99'])} | "
                         f"{_ms(lv['e2e_p50'])}/{_ms(lv['e2e_p99'])} | {'yes' if lv['slo_met'] else 'no'} | "
                         f"{', '.join(f'{k}×{v}' for k, v in lv['errors'].items()) or '-'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.gpu_report")
    sub = ap.add_subparsers(dest="cmd", required=True)
    lv = sub.add_parser("levels")
    lv.add_argument("--max", type=int, required=True)
    cap = sub.add_parser("capacity")
    cap.add_argument("--metrics-url")
    cap.add_argument("--log", type=Path)
    cap.add_argument("--default", type=int, default=32)
    fc = sub.add_parser("facts")
    fc.add_argument("--out", type=Path, required=True)
    fc.add_argument("--ckpt", type=Path, required=True)
    fc.add_argument("--no-bandwidth", action="store_true", help="Skip the CUDA copy measurement.")
    sm = sub.add_parser("summary")
    sm.add_argument("--out", type=Path, required=True)
    tk = sub.add_parser("tokenizer")
    tk.add_argument("--ckpt", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "levels":
        print(",".join(map(str, levels(a.max))))
    elif a.cmd == "capacity":
        found = capacity(a.metrics_url, a.log)
        if found is None:
            print(f"capacity: not found on /metrics or in the log; using {a.default}", file=sys.stderr)
        print(found or a.default)
    elif a.cmd == "tokenizer":
        print(f"tokenizer with {full_vocab_tokenizer(a.ckpt)} tokens written to {a.ckpt}")
    elif a.cmd == "facts":
        print(json.dumps(facts(a.out, a.ckpt, not a.no_bandwidth)))
    else:
        print(markdown(summary(a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
