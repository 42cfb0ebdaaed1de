"""Writers: ``results.json`` (machine-readable), ``levels.csv``, ``requests.jsonl``, PNG plots, ``report.md``.

``results.json`` schema (version 1)::

    {"schema": "loadtest/v1", "started": ISO-8601, "args": {...CLI options...},
     "target": {"url", "api_base", "model", "endpoint", "stream", "reachable", "models": [...], "error"},
     "slos": ["ttft p95 < 1000 ms", ...],
     "levels": [{"mode": "concurrency"|"rate", "value": float, "label": str,
                 "requests", "successes", "failures", "error_rate", "errors": {kind: count},
                 "error_examples": {kind: message}, "duration_s", "requests_per_s", "output_tokens_per_s",
                 "total_tokens_per_s", "prompt_tokens", "output_tokens", "mean_prompt_tokens",
                 "mean_output_tokens", "token_source": {"usage"|"chunks": count}, "mean_in_flight",
                 "ttft"|"itl"|"tpot"|"e2e": {"mean", "p50", "p90", "p95", "p99", "max"} (seconds),
                 "goodput": {"requests_per_s", "output_tokens_per_s", "fraction"},
                 "slo": {"met", "checks": [{"slo", "metric", "stat", "threshold_s", "value_s", "ok"}], ...},
                 "warmup_requests", "server": {...deltas of /metrics...} | null,
                 "server_check": {"counters": {name: {"client", "server", "match"}}, "agree"} | null}],
     "summary": {"best": {mode: level under the SLOs with the highest load} , "peak_output_tokens_per_s", ...}}

Times are seconds. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

CSV_COLUMNS = ["mode", "value", "requests", "successes", "failures", "requests_per_s", "output_tokens_per_s",
               "goodput_requests_per_s", "mean_in_flight", "mean_prompt_tokens", "mean_output_tokens",
               *(f"{m}_{s}" for m in ("ttft", "itl", "tpot", "e2e") for s in ("mean", "p50", "p90", "p95", "p99")),
               "slo_met", "errors"]


def atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def summarize_sweep(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: the highest load whose level met the SLOs, and whether any lower level missed them."""
    best: dict[str, Any] = {}
    for mode in ("concurrency", "rate"):
        rows = sorted((lv for lv in levels if lv["mode"] == mode), key=lambda lv: lv["value"])
        if not rows:
            continue
        met = [lv for lv in rows if lv["slo"]["met"]]
        top = met[-1] if met else None
        best[mode] = None if top is None else {
            "value": top["value"], "label": top["label"], "requests_per_s": top["requests_per_s"],
            "output_tokens_per_s": top["output_tokens_per_s"],
            "goodput_requests_per_s": top["goodput"]["requests_per_s"],
            "lower_level_missed": any(not lv["slo"]["met"] for lv in rows if lv["value"] < top["value"]),
        }
    ok = [lv for lv in levels if lv["successes"]]
    return {
        "best": best,
        "peak_output_tokens_per_s": max((lv["output_tokens_per_s"] for lv in ok), default=0.0),
        "peak_requests_per_s": max((lv["requests_per_s"] for lv in ok), default=0.0),
        "total_requests": sum(lv["requests"] for lv in levels),
        "total_failures": sum(lv["failures"] for lv in levels),
        "server_counts_agree": (all(lv["server_check"]["agree"] for lv in levels if lv.get("server_check"))
                                if any(lv.get("server_check") for lv in levels) else None),
    }


def write_json(out: Path, result: dict[str, Any]) -> Path:
    p = out / "results.json"
    atomic_write(p, json.dumps(_json_safe(result), indent=2, ensure_ascii=False) + "\n")
    return p


def write_csv(out: Path, levels: list[dict[str, Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for lv in levels:
        row = {"mode": lv["mode"], "value": lv["value"], "goodput_requests_per_s": lv["goodput"]["requests_per_s"],
               "slo_met": lv["slo"]["met"], "errors": ";".join(f"{k}={v}" for k, v in lv["errors"].items())}
        for m in ("ttft", "itl", "tpot", "e2e"):
            for s in ("mean", "p50", "p90", "p95", "p99"):
                row[f"{m}_{s}"] = lv[m][s]
        w.writerow([row.get(c, lv.get(c)) if row.get(c, lv.get(c)) is not None else "" for c in CSV_COLUMNS])
    p = out / "levels.csv"
    atomic_write(p, buf.getvalue())
    return p


def write_requests(out: Path, per_level: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> Path:
    lines = []
    for lv, reqs in per_level:
        for r in reqs:
            lines.append(json.dumps({"mode": lv["mode"], "value": _json_safe(lv["value"]), **r}))
    p = out / "requests.jsonl"
    atomic_write(p, "\n".join(lines) + ("\n" if lines else ""))
    return p


def write_plots(out: Path, levels: list[dict[str, Any]], slos: list[dict[str, Any]]) -> list[Path]:
    """``throughput_latency.png`` (output tokens/s against latency) and ``latency_vs_load.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths = []
    modes = [m for m in ("concurrency", "rate") if any(lv["mode"] == m and lv["successes"] for lv in levels)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in modes:
        rows = sorted((lv for lv in levels if lv["mode"] == mode and lv["successes"]), key=lambda lv: lv["value"])
        x = [lv["output_tokens_per_s"] for lv in rows]
        for ax, metric, title in ((axes[0], "ttft", "TTFT p50/p99"), (axes[1], "itl", "ITL p50/p99")):
            for stat, style in (("p50", "o-"), ("p99", "s--")):
                y = [(lv[metric][stat] or math.nan) * 1e3 for lv in rows]
                ax.plot(x, y, style, label=f"{mode} {stat}")
            for lv, xi in zip(rows, x, strict=True):
                ax.annotate(f"{lv['value']:g}", (xi, (lv[metric]["p50"] or math.nan) * 1e3), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
            ax.set(xlabel="output tokens/s", ylabel="ms", title=f"{title} vs throughput")
    for ax, metric in ((axes[0], "ttft"), (axes[1], "itl")):
        for s in slos:
            if s["metric"] == metric:
                ax.axhline(s["threshold_s"] * 1e3, color="red", lw=0.8, ls=":", label=f"SLO {s['stat']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out / "throughput_latency.png"))
    plt.close(fig)

    fig, axes = plt.subplots(len(modes) or 1, 3, figsize=(13, 3.8 * max(len(modes), 1)), squeeze=False)
    for i, mode in enumerate(modes):
        rows = sorted((lv for lv in levels if lv["mode"] == mode and lv["successes"]), key=lambda lv: lv["value"])
        x = [lv["value"] for lv in rows]
        for j, metric in enumerate(("ttft", "itl", "e2e")):
            ax = axes[i][j]
            for stat in ("p50", "p90", "p99"):
                ax.plot(x, [(lv[metric][stat] or math.nan) * 1e3 for lv in rows], "o-", label=stat)
            for s in slos:
                if s["metric"] == metric:
                    ax.axhline(s["threshold_s"] * 1e3, color="red", lw=0.8, ls=":", label=f"SLO {s['stat']}")
            ax.set(xlabel="requests in flight" if mode == "concurrency" else "offered requests/s", ylabel="ms",
                   title=f"{metric.upper()} percentiles ({mode})")
            if mode == "concurrency" and len(x) > 2:
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out / "latency_vs_load.png"))
    plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())
    return path


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def markdown(result: dict[str, Any]) -> str:
    t, s, levels = result["target"], result["summary"], result["levels"]
    lines = [f"# Load test: `{t['model']}` at {t['url']}", "",
             f"{result['started']} · endpoint `{t['endpoint']}` · streaming {'on' if t['stream'] else 'off'} · "
             f"{result['args'].get('prompt_source', '')}", ""]
    if t.get("error"):
        lines += [f"**Target error:** {t['error']}", ""]
    slos = result["slos"]
    lines += ["SLOs: " + (", ".join(slos) if slos else "none") + f"; error rate ≤ {result['args']['max_error_rate']:g}",
              ""]
    for mode, b in s["best"].items():
        if b is None:
            lines.append(f"- **{mode}**: no level met the SLOs.")
        else:
            note = " (a lower level missed them)" if b["lower_level_missed"] else ""
            lines.append(f"- **{mode}**: highest load meeting the SLOs: **{b['label']}** — "
                         f"{b['requests_per_s']:.2f} req/s, {b['output_tokens_per_s']:.1f} output tok/s{note}.")
    lines.append(f"- Peak: {s['peak_output_tokens_per_s']:.1f} output tok/s, {s['peak_requests_per_s']:.2f} req/s; "
                 f"{s['total_failures']} of {s['total_requests']} measured requests failed.")
    if s.get("server_counts_agree") is not None:
        lines.append(f"- Server `/metrics` counts {'agree' if s['server_counts_agree'] else '**disagree**'} "
                     "with the client's.")
    lines += ["", "| level | req | ok | req/s | out tok/s | goodput req/s | TTFT p50/p90/p99 ms | "
                  "ITL p50/p90/p99 ms | E2E p50/p90/p99 ms | SLO | errors |",
              "|---|---:|---:|---:|---:|---:|---|---|---|---|---|"]
    for lv in levels:
        def trio(m: str, lv: dict[str, Any] = lv) -> str:
            return "/".join(_ms(lv[m][p]) for p in ("p50", "p90", "p99"))

        errs = ", ".join(f"{k}×{v}" for k, v in lv["errors"].items()) or "-"
        lines.append(f"| {lv['label']} | {lv['requests']} | {lv['successes']} | {lv['requests_per_s']:.2f} | "
                     f"{lv['output_tokens_per_s']:.1f} | {lv['goodput']['requests_per_s']:.2f} | {trio('ttft')} | "
                     f"{trio('itl')} | {trio('e2e')} | {'✅' if lv['slo']['met'] else '❌'} | {errs} |")
    examples = {k: v for lv in levels for k, v in lv["error_examples"].items()}
    if examples:
        lines += ["", "Errors seen:", ""] + [f"- `{k}`: {v}" for k, v in examples.items()]
    checks = [lv for lv in levels if lv.get("server_check")]
    if checks:
        names = [n for n in ("successes", "prompt_tokens", "output_tokens")
                 if any(n in lv["server_check"]["counters"] for lv in checks)]
        lat = [m for m in ("ttft", "e2e") if any(lv["server"].get(f"{m}_mean_s") is not None for lv in checks)]
        lines += ["", "Client vs server (`/metrics` deltas per level, client / server; the client's latencies "
                      "add the network and the HTTP stack):", "",
                  "| level | " + " | ".join(names + [f"{m.upper()} mean ms" for m in lat]) + " |",
                  "|---|" + "---:|" * (len(names) + len(lat))]
        for lv in checks:
            cells = []
            for n in names:
                c = lv["server_check"]["counters"].get(n)
                cells.append("-" if c is None else f"{c['client']:g} / {c['server']:g}" + ("" if c["match"] else " ❗"))
            for m in lat:
                cells.append(f"{_ms(lv[m]['mean'])} / {_ms(lv['server'].get(f'{m}_mean_s'))}")
            lines.append(f"| {lv['label']} | " + " | ".join(cells) + " |")
    lines += ["", "![throughput vs latency](throughput_latency.png)", "", "![latency vs load](latency_vs_load.png)",
              "", "Files: `results.json` (schema in `loadtest/report.py`), `levels.csv`, `requests.jsonl`.", ""]
    return "\n".join(lines)


def write_all(out: Path, result: dict[str, Any], per_level_requests: list[tuple[dict[str, Any], list[dict]]],
              plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if plots and any(lv["successes"] for lv in result["levels"]):
        try:
            paths += write_plots(out, result["levels"], [c for lv in result["levels"][:1]
                                                         for c in lv["slo"]["checks"]])
        except ImportError:
            msg = "matplotlib not installed: no plots (pip install '.[loadtest]')"
            if msg not in result.setdefault("warnings", []):
                result["warnings"].append(msg)
                print(f"warning: {msg}", file=sys.stderr)
    paths += [write_json(out, result), write_csv(out, result["levels"]), write_requests(out, per_level_requests)]
    md = out / "report.md"
    atomic_write(md, markdown(result))
    return [*paths, md]


def rewrite(out: Path) -> list[Path]:
    """Redraw plots and ``report.md`` from ``results.json`` and ``requests.jsonl`` (e.g. after a run on a machine
    without matplotlib)."""
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    result["warnings"] = [w for w in result.get("warnings", []) if "matplotlib" not in w]
    for lv in result["levels"]:
        lv["value"] = float(lv["value"])  # "inf" back to a number
    reqs: dict[tuple[str, Any], list[dict]] = {}
    rp = out / "requests.jsonl"
    for line in rp.read_text(encoding="utf-8").splitlines() if rp.exists() else []:
        r = json.loads(line)
        reqs.setdefault((r.pop("mode"), r.pop("value")), []).append(r)
    per_level = [(lv, reqs.get((lv["mode"], _json_safe(lv["value"])), [])) for lv in result["levels"]]
    return write_all(out, result, per_level)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m loadtest.report", description=rewrite.__doc__)
    ap.add_argument("dirs", nargs="+", type=Path, help="Load-test output folders holding results.json.")
    for d in ap.parse_args().dirs:
        print("\n".join(str(p) for p in rewrite(d)))
