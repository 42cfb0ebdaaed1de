"""The quality-gpu PPO stage once per rollout engine, side by side (tests/gpu/bench_rollout.sh quality).

    python tests/gpu/rollout_quality.py --manifest runs/quality-gpu/ppo/manifest.json --steps 20 --out q.json

Reruns PPO from the configuration its manifest recorded (same SFT actor, RM, data and sampling), with
``ppo.rollout_engine`` hf and then serving (``--engines``; ``serving+compile`` adds
``ppo.rollout_compile``), ``--steps`` steps each, no checkpoints; reports per engine the mean step
time and phase seconds (steps after the first two), the mean per-step KL and reward, the held-out greedy reward
before and after, and the engine-over-HF speedups. Prints the JSON and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ENGINES = ("hf", "serving")
VARIANTS = (*ENGINES, "serving+compile")  # the last: the engine with ppo.rollout_compile


def mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def run_engine(cfg: dict, engine: str, steps: int, work: Path, skip: int) -> dict:
    out = work / f"ppo-{engine}"
    cfg = json.loads(json.dumps(cfg))
    cfg["checkpoint"].update(output_dir=str(out), save_every=0)
    cfg["train"]["max_steps"] = steps
    name, _, variant = engine.partition("+")
    cfg["ppo"]["rollout_engine"] = name
    cfg["ppo"]["rollout_compile"] = variant == "compile"
    cfg["log"]["progress"] = False
    path = work / f"ppo-{engine}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    with (work / f"ppo-{engine}.log").open("w") as log:
        rc = subprocess.run([sys.executable, "-m", "training.ppo", "--config", str(path)], stdout=log,
                            stderr=subprocess.STDOUT).returncode
    res: dict = {"engine": engine, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1)}
    if rc != 0:
        res["error"] = (work / f"ppo-{engine}.log").read_text(errors="replace")[-3000:]
        return res
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split", "train") == "train"]
    kept = train[skip:] or train
    manifest = json.loads((out / "manifest.json").read_text())
    res.update({k: mean(kept, k) for k in ("step_time_s", "rollout_s", "sync_s", "update_s", "tokens_per_s")})
    res.update({"kl_mean": mean(train, "kl"), "kl_last": train[-1].get("kl"), "reward_mean": mean(train, "reward"),
                "response_length": mean(train, "response_length"),
                "eval_reward_before": manifest["metrics"].get("eval_reward_before"),
                "eval_reward_after": manifest["metrics"].get("eval_reward_after"),
                "rollout": manifest["inputs"].get("rollout")})
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--work", default="/tmp/rollout-quality")
    ap.add_argument("--out", required=True)
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="which to run, in order (one per call when both do not fit one 10-minute device call)")
    args = ap.parse_args(argv)
    cfg = json.loads(Path(args.manifest).read_text())["config"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"manifest": args.manifest, "steps": args.steps, "runs": {}}
    out = Path(args.out)
    if out.exists():  # an earlier call's engines (the same --out): kept unless run again
        result["runs"] = json.loads(out.read_text()).get("runs", {})
    for engine in args.engines.split(","):
        if engine not in VARIANTS:
            ap.error(f"--engines: {engine!r} is not one of {VARIANTS}")
        result["runs"][engine] = run_engine(cfg, engine, args.steps, work, args.skip)
        print(json.dumps(result["runs"][engine]), flush=True)
        out.write_text(json.dumps(result, indent=1))  # after each engine: a call cut off keeps what finished
    hf = result["runs"].get("hf", {})
    for name in VARIANTS[1:]:
        sv = result["runs"].get(name, {})
        if hf.get("step_time_s") and sv.get("step_time_s"):
            result.setdefault("speedup", {})[name] = {"step_time": round(hf["step_time_s"] / sv["step_time_s"], 2),
                                                      "rollout_time": round(hf["rollout_s"] / sv["rollout_s"], 2)}
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if all(r["rc"] == 0 for r in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
