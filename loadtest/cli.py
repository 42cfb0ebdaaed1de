"""``python -m loadtest --url URL --model NAME --out DIR [options]``: sweep load levels against an OpenAI-compatible
server and write the report.

Examples::

    # this project's server, real prompts, concurrency sweep and two Poisson rates, SLOs
    python -m loadtest --url http://localhost:8000 --model tinyllama --out runs/lt \\
        --prompts ../shared/data/instructionwild --concurrency 1,2,4,8,16 --rate 1,4 \\
        --slo 'ttft_p95<1s' --slo 'itl_p95<100ms' --metrics-url http://localhost:8000/metrics
    # synthetic 512-in/128-out prompts against vLLM, fixed output length
    python -m loadtest --url http://vllm:8000/v1 --model m --out runs/vllm --input-tokens 512 --output-tokens 128 \\
        --ignore-eos --concurrency 1,8,32

Exit status: 0 when the sweep ran and some request succeeded, 1 when the target was unreachable or every request
failed (the report is still written and says why), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.client import Prompt, api_base
from loadtest.prompts import PromptError, load_prompts, synthetic_prompts
from loadtest.report import summarize_sweep, write_all
from loadtest.runner import Level, LevelRun, RunOptions, run_level
from loadtest.stats import SLO, compare_with_server, server_delta, summarize


def _floats(s: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from e
    if not vals or any(v <= 0 or math.isnan(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}")
    return vals


def _ints(s: str) -> list[int]:
    vals = _floats(s)
    if any(v != int(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected whole numbers, got {s!r}")
    return [int(v) for v in vals]


def _slo(s: str) -> SLO:
    try:
        return SLO.parse(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t = p.add_argument_group("target")
    t.add_argument("--url", required=True, help="Server base URL (http://host:port or .../v1).")
    t.add_argument("--model", required=True, help="Model name sent in requests.")
    t.add_argument("--api-key", help="Bearer token (default: env OPENAI_API_KEY).")
    t.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    t.add_argument("--no-stream", dest="stream", action="store_false", help="Non-streaming requests (TTFT = E2E).")
    t.add_argument("--no-stream-usage", dest="stream_usage", action="store_false",
                   help="Leave out stream_options.include_usage (for servers that reject it); tokens are then "
                        "counted as content chunks.")
    t.add_argument("--metrics-url", help="Prometheus /metrics of the server: scraped before and after each level "
                                         "and compared with the client's counts.")
    t.add_argument("--metrics-settle", type=float, default=10.0,
                   help="Seconds to wait at most for the server's counters to count a level's requests.")
    t.add_argument("--timeout", type=float, default=600.0, help="Seconds one request may take.")
    t.add_argument("--extra-body", type=json.loads, help="JSON object merged into every request body.")

    w = p.add_argument_group("workload")
    w.add_argument("--prompts", help="Prompt file (.jsonl/.json/.txt, .gz ok) or folder of them, "
                                     "e.g. ../shared/data/instructionwild. Default: synthetic prompts.")
    w.add_argument("--prompt-field", help="Field holding the prompt (default: messages, instruction, prompt...).")
    w.add_argument("--input-tokens", type=int, default=256, help="Synthetic prompt length.")
    w.add_argument("--tokenizer", help="Tokenizer folder to make synthetic prompts exactly --input-tokens long.")
    w.add_argument("--output-tokens", type=int, default=128, help="max_tokens of every request.")
    w.add_argument("--ignore-eos", action="store_true", help="Ask for exactly --output-tokens tokens "
                                                             "(ignore_eos, a vLLM extension).")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--seed", type=int, default=0)

    s = p.add_argument_group("sweep")
    s.add_argument("--concurrency", type=_ints, help="Fixed-concurrency levels, e.g. 1,2,4,8.")
    s.add_argument("--rate", type=_floats, help="Poisson request rates (req/s), e.g. 0.5,1,2; 'inf' = all at once.")
    s.add_argument("--max-concurrency", type=int, help="Cap on requests in flight at a rate level.")
    s.add_argument("--requests", type=int, default=100, help="Measured requests per level (0: no count bound).")
    s.add_argument("--requests-per-concurrency", type=int, default=0, metavar="K",
                   help="Concurrency levels measure at least K x concurrency requests.")
    s.add_argument("--duration", type=float, default=300.0, help="Seconds per level at most (0: no time bound).")
    s.add_argument("--warmup", type=int, default=2, help="Warm-up requests per level, left out of the results.")
    s.add_argument("--slo", action="append", default=[], type=_slo, metavar="SPEC",
                   help="e.g. 'ttft_p95<1s', 'itl_p95<100ms', 'e2e_p99<30s', 'tpot_mean<50ms' (repeatable).")
    s.add_argument("--max-error-rate", type=float, default=0.0, help="A level with more failures misses the SLOs.")
    s.add_argument("--stop-after-miss", type=int, default=0,
                   help="Stop a mode's sweep after this many consecutive levels missed the SLOs (0: never).")

    s.add_argument("--smoke", action="store_true",
                   help="Quick check that the target works: concurrency 1, 3 requests of 16 tokens, no warm-up.")

    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="Output folder (default runs/loadtest-<time>).")
    o.add_argument("--no-plots", dest="plots", action="store_false")
    o.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _prompts(args: argparse.Namespace) -> tuple[list[Prompt], str]:
    need = max(args.requests or 100, 100)
    if args.prompts:
        ps = load_prompts(args.prompts, args.output_tokens, args.prompt_field, seed=args.seed)
        return ps, f"prompts from `{args.prompts}` ({len(ps)})"
    ps = synthetic_prompts(need, args.input_tokens, args.output_tokens, args.tokenizer, args.seed)
    exact = "exact" if args.tokenizer else "~"
    return ps, f"synthetic prompts ({exact}{args.input_tokens} tokens in)"


async def _preflight(session: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> dict[str, Any]:
    """GET /v1/models: is anything listening, and which models does it serve."""
    try:
        async with session.get(base + "/models", headers=headers, timeout=aiohttp.ClientTimeout(total=15)) as r:
            info: dict[str, Any] = {"reachable": True, "models_status": r.status}
            if r.status == 200:
                try:
                    data = await r.json(content_type=None)
                    info["models"] = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
                except (ValueError, AttributeError):
                    pass
            return info
    except (aiohttp.ClientError, TimeoutError) as e:
        return {"reachable": False, "error": f"cannot reach {base}: {type(e).__name__}: {e}"}


def _level_dict(run: LevelRun, slos: list[SLO], max_error_rate: float) -> dict[str, Any]:
    lv = {"mode": run.level.mode, "value": run.level.value, "label": run.level.label,
          **summarize(run.results, run.duration, slos, max_error_rate),
          "warmup_requests": len(run.warmup_results), "warmup_failures": sum(not r.ok for r in run.warmup_results),
          "server": None, "server_check": None}
    if run.metrics_error:
        lv["server"] = {"error": run.metrics_error}
    elif run.server_before is not None and run.server_after is not None:
        lv["server"] = server_delta(run.server_before, run.server_after)
        lv["server_check"] = compare_with_server(lv, lv["server"])
    return lv


async def sweep(args: argparse.Namespace, prompts: list[Prompt], levels: list[Level], out: Path,
                result: dict[str, Any]) -> int:
    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    base = api_base(args.url)
    opts = RunOptions(base=base, model=args.model, endpoint=args.endpoint, stream=args.stream,
                      stream_usage=args.stream_usage, headers=headers,
                      timeout=args.timeout, ignore_eos=args.ignore_eos, temperature=args.temperature,
                      extra_body=args.extra_body, requests=args.requests or None,
                      requests_per_concurrency=args.requests_per_concurrency, duration=args.duration or None,
                      warmup=args.warmup, max_concurrency=args.max_concurrency, seed=args.seed,
                      progress=args.progress, metrics_url=args.metrics_url,
                      metrics_settle=args.metrics_settle)
    limit = max([int(lv.value) for lv in levels if lv.mode == "concurrency"] + [args.max_concurrency or 0, 100])
    connector = aiohttp.TCPConnector(limit=limit + 8)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    per_level: list[tuple[dict[str, Any], list[dict]]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=True) as session:
        target = result["target"]
        target.update(await _preflight(session, base, headers))
        if not target["reachable"]:
            print(f"error: {target['error']}", file=sys.stderr)
            _finish(out, result, per_level, args.plots)
            return 1
        if target.get("models") and args.model not in target["models"]:
            print(f"warning: server lists models {target['models']}, not {args.model!r}", file=sys.stderr)
        misses = {"concurrency": 0, "rate": 0}
        for level in levels:
            if args.stop_after_miss and misses[level.mode] >= args.stop_after_miss:
                continue
            run = await run_level(session, level, prompts, opts)
            lv = _level_dict(run, args.slo, args.max_error_rate)
            misses[level.mode] = 0 if lv["slo"]["met"] else misses[level.mode] + 1
            result["levels"].append(lv)
            per_level.append((lv, [r.to_json() for r in run.results]))
            _print_level(lv)
            _finish(out, result, per_level, plots=False)  # keep what is done if the sweep is cut short
    _finish(out, result, per_level, args.plots)
    if not any(lv["successes"] for lv in result["levels"]):
        kinds = {k: v for lv in result["levels"] for k, v in lv["errors"].items()}
        print(f"error: no request succeeded ({', '.join(f'{k}×{v}' for k, v in kinds.items())}); "
              f"see {out / 'report.md'}", file=sys.stderr)
        return 1
    return 0


def _finish(out: Path, result: dict[str, Any], per_level: list, plots: bool) -> None:
    result["summary"] = summarize_sweep(result["levels"])
    result["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_all(out, result, per_level, plots=plots)


def _print_level(lv: dict[str, Any]) -> None:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.0f}ms"

    errs = ", ".join(f"{k}×{v}" for k, v in lv["errors"].items())
    print(f"[{lv['label']}] {lv['successes']}/{lv['requests']} ok, {lv['requests_per_s']:.2f} req/s, "
          f"{lv['output_tokens_per_s']:.1f} out tok/s, TTFT p50 {ms(lv['ttft']['p50'])} p99 {ms(lv['ttft']['p99'])}, "
          f"ITL p50 {ms(lv['itl']['p50'])} p99 {ms(lv['itl']['p99'])}, SLO {'met' if lv['slo']['met'] else 'missed'}"
          + (f", errors: {errs}" if errs else ""), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.rate, args.requests, args.warmup = [1], None, 3, 0
        args.output_tokens, args.input_tokens, args.duration = 16, 32, 60.0
    if not args.concurrency and not args.rate:
        args.concurrency = [1, 2, 4, 8]
    if not args.requests and not args.duration:
        parser.error("--requests 0 and --duration 0: a level would never end")
    if args.output_tokens < 1 or args.input_tokens < 1:
        parser.error("--input-tokens and --output-tokens must be >= 1")
    try:
        prompts, source = _prompts(args)
    except PromptError as e:
        parser.error(str(e))
    out = args.out or Path("runs") / f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}"
    levels = [Level("concurrency", c) for c in args.concurrency or []] + [Level("rate", r) for r in args.rate or []]
    record = {k: v for k, v in vars(args).items() if k not in ("api_key", "slo", "out")}
    record.update(prompt_source=source, out=str(out))
    result: dict[str, Any] = {
        "schema": "loadtest/v1", "started": datetime.now(UTC).isoformat(timespec="seconds"), "args": record,
        "target": {"url": args.url, "api_base": api_base(args.url), "model": args.model, "endpoint": args.endpoint,
                   "stream": args.stream},
        "slos": [str(s) for s in args.slo], "levels": [],
    }
    try:
        rc = asyncio.run(sweep(args, prompts, levels, out, result))
    except KeyboardInterrupt:
        print(f"interrupted; levels done so far are in {out}", file=sys.stderr)
        return 130
    print(f"report: {out / 'report.md'}", file=sys.stderr)
    return rc
