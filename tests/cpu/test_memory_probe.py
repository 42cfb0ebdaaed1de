"""tests/gpu/memory_probe.py in its CPU smoke mode: the engine's load marks in order, both runs served, the JSON
shape the GPU run reports (NVML figures are None on CPU: the numbers themselves are the GPU benchmark's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_memory_probe_smoke_reports_the_load_steps_and_both_runs(tmp_path: Path):
    out = tmp_path / "mem.json"
    done = subprocess.run([sys.executable, "tests/gpu/memory_probe.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rep = json.loads(out.read_text())
    names = [s[0] for s in rep["steps"]]
    # CPU: no context step, no graphs; the order the engine loads in
    assert names == ["weights", "lm_head", "first_prefill", "kv_cache", "fitted", "warmed_up"], names
    assert all(s[1] is None for s in rep["steps"]) and rep["peak_mib"] is None
    n = rep["max_model_len"]
    assert [r["lengths"] for r in rep["runs"]] == [[n], [n // 2, n // 2]]
    assert all(not r["errors"] and all(g > 0 for g in r["generated"]) for r in rep["runs"])
    assert rep["kv_cache_tokens"] >= n and set(rep["targets"]) == {"peak_le_4096_mib", "holds_1024_tokens",
                                                                   "stretch_2048_tokens"}


def test_outside_allocator_probe_runs_its_engine_kernel_candidates_on_cpu():
    """tests/gpu/outside_alloc_probe.py --check: the first-decode candidates' code (Triton decode attention, W8A16
    lm_head, the compiled decode pieces) runs under the interpreter, and every candidate is listed."""
    done = subprocess.run([sys.executable, "tests/gpu/outside_alloc_probe.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    listed = subprocess.run([sys.executable, "tests/gpu/outside_alloc_probe.py", "--list"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60).stdout.split()
    assert {"control", "stream", "cuda_graph", "decode_pieces_inductor", "paged_decode_attention"} <= set(listed)
    bad = subprocess.run([sys.executable, "tests/gpu/outside_alloc_probe.py", "--only", "nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown candidates ['nope']" in bad.stderr
