"""Per-level statistics: latency percentiles, throughput, errors, SLO checks and goodput, and the server's own
counts from its Prometheus ``/metrics`` (vLLM metric names)."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.client import RequestResult

PERCENTILES = (50, 90, 95, 99)
METRICS = ("ttft", "itl", "tpot", "e2e")
_UNITS = {"ms": 1e-3, "s": 1.0}
_SLO_RE = re.compile(r"^(ttft|itl|tpot|e2e)_(p\d{1,2}(?:\.\d+)?|mean|max)\s*(?:<|=|<=)\s*([\d.]+)\s*(ms|s)$")

# Server-side counters compared with the client's own counts (vLLM names; this project's server uses them too).
SERVER_COUNTERS = {
    "prompt_tokens": "vllm:prompt_tokens_total",
    "output_tokens": "vllm:generation_tokens_total",
    "successes": "vllm:request_success_total",
}
SERVER_ERRORS = "vllm:request_errors_total"
SERVER_HISTOGRAMS = {"ttft": "vllm:time_to_first_token_seconds", "e2e": "vllm:e2e_request_latency_seconds",
                     "itl": "vllm:inter_token_latency_seconds", "tpot": "vllm:time_per_output_token_seconds"}


@dataclass(frozen=True)
class SLO:
    """``metric``'s ``stat`` (``p95``, ``mean``...) must stay below ``threshold`` seconds."""

    metric: str
    stat: str
    threshold: float

    @classmethod
    def parse(cls, spec: str) -> SLO:
        m = _SLO_RE.match(spec.strip().lower())
        if not m:
            raise ValueError(f"--slo {spec!r}: expected METRIC_STAT<VALUE UNIT, e.g. ttft_p95<1s or itl_p95=100ms "
                             f"(metrics: {', '.join(METRICS)}; stats: p50..p99, mean, max; units: ms, s)")
        metric, stat, value, unit = m.groups()
        return cls(metric, stat, float(value) * _UNITS[unit])

    def __str__(self) -> str:
        return f"{self.metric} {self.stat} < {self.threshold * 1e3:g} ms"

    def per_request(self, r: RequestResult) -> float | None:
        """This request's own value of the metric (its ITL percentile for ``itl``)."""
        if self.metric == "ttft":
            return r.ttft
        if self.metric == "e2e":
            return r.latency
        if self.metric == "tpot":
            return r.tpot
        gaps = r.itls
        return _stat(gaps, self.stat) if gaps else None


def _stat(values: list[float] | np.ndarray, stat: str) -> float:
    a = np.asarray(values, dtype=float)
    if stat == "mean":
        return float(a.mean())
    if stat == "max":
        return float(a.max())
    return float(np.percentile(a, float(stat[1:])))


def distribution(values: list[float]) -> dict[str, float | None]:
    """mean, p50/p90/p95/p99, max (seconds); all None when there are no values."""
    keys = ["mean", *(f"p{p}" for p in PERCENTILES), "max"]
    if not values:
        return dict.fromkeys(keys)
    return {k: _stat(values, k) for k in keys}


def summarize(results: list[RequestResult], duration: float, slos: list[SLO], max_error_rate: float = 0.0,
              ) -> dict[str, Any]:
    """Everything the report shows for one level, from the measured (post-warm-up) requests."""
    ok = [r for r in results if r.ok]
    errors = Counter(r.error or "unknown" for r in results if not r.ok)
    duration = max(duration, 1e-9)
    values = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "itl": [g for r in ok for g in r.itls],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "e2e": [r.latency for r in ok],
    }
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    n = len(results)
    error_rate = (n - len(ok)) / n if n else 1.0
    checks = []
    for slo in slos:
        v = _stat(values[slo.metric], slo.stat) if values[slo.metric] else None
        checks.append({"slo": str(slo), "metric": slo.metric, "stat": slo.stat, "threshold_s": slo.threshold,
                       "value_s": v, "ok": v is not None and v < slo.threshold})
    good = [r for r in ok if all((v := s.per_request(r)) is not None and v < s.threshold for s in slos)]
    error_ok = error_rate <= max_error_rate
    return {
        "requests": n,
        "successes": len(ok),
        "failures": n - len(ok),
        "error_rate": error_rate,
        "errors": dict(sorted(errors.items())),
        "error_examples": _examples(results),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (out_tokens + in_tokens) / duration,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "mean_prompt_tokens": in_tokens / len(ok) if ok else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "token_source": dict(Counter(r.token_source for r in ok)),
        "mean_in_flight": sum(r.latency for r in results) / duration,
        **{m: distribution(values[m]) for m in METRICS},
        "goodput": {"requests_per_s": len(good) / duration,
                    "output_tokens_per_s": sum(r.output_tokens for r in good) / duration,
                    "fraction": len(good) / n if n else 0.0},
        "slo": {"met": bool(ok) and error_ok and all(c["ok"] for c in checks), "checks": checks,
                "max_error_rate": max_error_rate, "error_rate_ok": error_ok},
    }


def _examples(results: list[RequestResult]) -> dict[str, str]:
    ex: dict[str, str] = {}
    for r in results:
        if not r.ok and r.error and r.error not in ex:
            ex[r.error] = r.error_detail or ""
    return ex


# --- Prometheus ---------------------------------------------------------------------------------------------------

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str, model: str | None = None) -> dict[str, float]:
    """Sum of each sample name over its label sets; samples labelled with another ``model_name`` are skipped."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        if model and labels:
            lab = dict(_LABEL_RE.findall(labels))
            if "model_name" in lab and lab["model_name"] != model:
                continue
        try:
            v = float(value)
        except ValueError:
            continue
        if math.isnan(v):
            continue
        sums[name] = sums.get(name, 0.0) + v
    return sums


def server_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Counts the server recorded during a level, keyed like the client's, plus its mean latencies."""
    d = {k: after.get(n, 0.0) - before.get(n, 0.0) for k, n in SERVER_COUNTERS.items() if n in after}
    if SERVER_ERRORS in after:  # reported, not compared: a proxy in front may refuse requests the app never sees
        d["http_errors"] = after[SERVER_ERRORS] - before.get(SERVER_ERRORS, 0.0)
    for key, name in SERVER_HISTOGRAMS.items():
        c, s = f"{name}_count", f"{name}_sum"
        if c in after and s in after:
            count = after[c] - before.get(c, 0.0)
            d[f"{key}_count"] = count
            d[f"{key}_mean_s"] = (after[s] - before.get(s, 0.0)) / count if count else None
    return d


def compare_with_server(level: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    """Client vs server counts (``agree`` is True when every counter both sides have matches exactly)."""
    rows = {}
    for key in SERVER_COUNTERS:
        if key in server:
            client = level[key]
            rows[key] = {"client": client, "server": server[key], "match": abs(client - server[key]) < 0.5}
    return {"counters": rows, "agree": bool(rows) and all(r["match"] for r in rows.values())}
