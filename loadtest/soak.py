"""Soak benchmark: ``python -m loadtest.soak --model PATH --out DIR [--minutes 10] [--fraction 0.9]``.

Starts ``python -m serving`` with the CPU profile (``serving/configs/cpu-small.yaml``, loopback, a free port),
measures saturation (the best requests/s over closed-loop concurrency levels up to the admission limit), then
sends Poisson arrivals at ``fraction`` x saturation for ``minutes`` while sampling the replica's RSS every
``--rss-every`` seconds. Writes ``DIR/soak.json`` and prints it::

    {"saturation": {"requests_per_s": ..., "by_concurrency": {...}}, "rate_per_s": ..., "minutes": ...,
     "requests": N, "by_status": {"200": ..., "429": ...}, "server_errors_5xx": 0, "other_failures": {...},
     "ttft_s": {...}, "e2e_s": {...}, "rss_mib": {"start": ..., "end": ..., "max": ..., "drift": ...},
     "rss_samples": [[t_s, mib], ...]}

``rss_mib.start`` is read after the saturation phase (warm caches, allocator grown), so ``drift`` is what the
soak itself added. Exit status 0 when no request got a 5xx (or failed at the transport level), else 1.
Not a CI test: it takes ``minutes`` + about a minute of set-up on the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.prompts import synthetic_prompts
from loadtest.runner import Level, RunOptions, run_level
from loadtest.stats import distribution
from training.demo import stop_server

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "serving" / "configs" / "cpu-small.yaml"
MODEL_NAME = "soak"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_pids(session_leader: int) -> list[int]:
    """Ray Serve replica processes started by the server (same session: it runs with a new session)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) != session_leader:
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ProcessLookupError):
            continue
        if b"ServeReplica" in cmd:
            pids.append(int(d.name))
    return pids


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def start_server(model: str, port: int, log: Path, ray_tmp: str, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "RAY_TMPDIR": ray_tmp,
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("API_KEYS", None)
    cmd = [sys.executable, "-m", "serving", "--config", str(CONFIG), "--model", model, f"port={port}",
           f"served_model_name={MODEL_NAME}", f"ray_metrics_export_port={_free_port()}", *overrides]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                async with s.get(base + "/ready", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return await r.json()
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(1)
    raise SystemExit(f"server not ready after {timeout} s")


async def sample_rss(leader: int, every: float, samples: list[list[float]], t0: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        mib = sum(v for p in replica_pids(leader) if (v := rss_mib(p)) is not None)
        samples.append([round(time.monotonic() - t0, 1), round(mib, 1)])
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    ray_tmp = tempfile.mkdtemp(prefix="soak-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = out / "server.log"
    proc = start_server(args.model, port, log, ray_tmp, args.override)
    try:
        ready = await wait_ready(base, proc, log)
        prompts = synthetic_prompts(256, args.input_tokens, args.output_tokens, seed=0)
        opts = RunOptions(base=base + "/v1", model=MODEL_NAME, stream=True, ignore_eos=True, warmup=2,
                          requests=None, duration=args.saturation_seconds, progress=False, timeout=120)
        by_conc: dict[int, float] = {}
        async with aiohttp.ClientSession() as session:
            conc = 1
            while conc <= int(ready["slots"]):
                run = await run_level(session, Level("concurrency", conc), prompts, opts)
                ok = [r for r in run.results if r.ok]
                by_conc[conc] = len(ok) / max(run.duration, 1e-9)
                conc *= 2
            saturation = max(by_conc.values())
            rate = args.fraction * saturation
            samples: list[list[float]] = []
            stop = asyncio.Event()
            t0 = time.monotonic()
            sampler = asyncio.create_task(sample_rss(proc.pid, args.rss_every, samples, t0, stop))
            soak_opts = RunOptions(base=base + "/v1", model=MODEL_NAME, stream=True, ignore_eos=True, warmup=0,
                                   requests=None, duration=args.minutes * 60, progress=False, timeout=120,
                                   seed=1)  # open loop: arrivals do not wait for answers
            run = await run_level(session, Level("rate", rate), prompts, soak_opts)
            stop.set()
            await sampler
        results = run.results
        status = Counter(str(r.status) if r.status is not None else (r.error or "none") for r in results)
        five = sum(1 for r in results if r.status is not None and r.status >= 500)
        transport = Counter(r.error for r in results if r.status is None and not r.ok)
        rss = [m for _, m in samples if m > 0]
        ok = [r for r in results if r.ok]
        return {
            "config": str(CONFIG.relative_to(ROOT)), "overrides": args.override, "model": args.model,
            "slots": ready["slots"],
            "saturation": {"requests_per_s": round(saturation, 3),
                           "by_concurrency": {str(k): round(v, 3) for k, v in by_conc.items()}},
            "fraction": args.fraction, "rate_per_s": round(rate, 3), "minutes": args.minutes,
            "requests": len(results), "requests_per_s": round(len(ok) / max(run.duration, 1e-9), 3),
            "by_status": dict(sorted(status.items())), "server_errors_5xx": five,
            "transport_failures": dict(transport),
            "ttft_s": distribution([r.ttft for r in ok if r.ttft is not None]),
            "e2e_s": distribution([r.latency for r in ok]),
            "rss_mib": {"start": rss[0] if rss else None, "end": rss[-1] if rss else None,
                        "max": max(rss) if rss else None,
                        "drift": round(rss[-1] - rss[0], 1) if rss else None},
            "rss_samples": samples,
        }
    finally:
        stop_server(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Model folder to serve.")
    p.add_argument("--out", required=True, help="Folder for soak.json and server.log.")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--fraction", type=float, default=0.9, help="Share of the measured saturation to send.")
    p.add_argument("--saturation-seconds", type=float, default=20.0, help="Length of each saturation level.")
    p.add_argument("--input-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--rss-every", type=float, default=10.0)
    p.add_argument("override", nargs="*", help="ServeConfig overrides for the server, e.g. engine.max_num_seqs=4")
    args = p.parse_args(argv)
    if not 0 < args.fraction <= 1 or args.minutes <= 0:
        p.error("--fraction must be in (0, 1] and --minutes positive")
    report = asyncio.run(soak(args))
    text = json.dumps(report, indent=2)
    (Path(args.out) / "soak.json").write_text(text + "\n")
    print(text)
    return 0 if report["server_errors_5xx"] == 0 and not report["transport_failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
