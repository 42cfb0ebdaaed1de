"""Init-container helper of the colossal-rlhf chart: wait for a stage to complete, fetch inputs.

    python stagectl.py wait DIR [DIR ...] [--timeout S] [--interval S]
        Block until every DIR holds a complete manifest.json (the stage-complete mark of training.checkpoint),
        exit 1 after --timeout seconds.
    python stagectl.py fetch SOURCE DEST [--sha256 HEX] [--repo-type model|dataset]
        Put SOURCE at DEST unless DEST exists: hf://ORG/NAME[@REVISION] (a Hub snapshot through
        huggingface_hub), https://... or file://... (one file, written atomically, sha256-checked).
    python stagectl.py ready URL [--timeout S]
        Block until URL answers 200 (the API's /ready), exit 1 after --timeout seconds.

Shipped in a ConfigMap by the chart and run with the images' Python: standard library only, except
huggingface_hub for hf:// sources (installed with transformers in both images).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

MANIFEST = "manifest.json"


def manifest_status(folder: Path) -> str | None:
    """``None`` when the stage in ``folder`` is complete, else why not (missing, unreadable, not complete)."""
    path = folder / MANIFEST
    if not path.is_file():
        return f"{path} not there yet"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{path} unreadable ({e})"
    if not isinstance(data, dict) or data.get("status", "complete") != "complete":
        return f"{path} does not mark a complete stage"
    return None


def wait(folders: list[Path], timeout: float, interval: float) -> int:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        pending = [s for s in (manifest_status(f) for f in folders) if s]
        if not pending:
            print("ready: " + ", ".join(str(f / MANIFEST) for f in folders), flush=True)
            return 0
        if pending[0] != last:
            print("waiting: " + pending[0], flush=True)
            last = pending[0]
        if time.monotonic() >= deadline:
            print(f"error: gave up after {timeout:.0f}s: " + "; ".join(pending), file=sys.stderr)
            return 1
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(source: str, dest: Path, sha256: str | None, repo_type: str) -> int:
    if dest.exists():
        print(f"present: {dest}", flush=True)
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.startswith("hf://"):
        from huggingface_hub import snapshot_download

        repo, _, revision = source[len("hf://"):].partition("@")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        snapshot_download(repo_id=repo, revision=revision or None, repo_type=repo_type, local_dir=str(tmp))
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        os.replace(tmp, dest)
    elif source.startswith(("https://", "http://", "file://")):
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(source, timeout=60) as resp:  # noqa: S310
                shutil.copyfileobj(resp, out, 1 << 20)
            if sha256 and _sha256(tmp) != sha256.lower():
                print(f"error: {source}: sha256 {_sha256(tmp)} != expected {sha256}", file=sys.stderr)
                return 1
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        print(f"error: source {source!r}: expected hf://ORG/NAME[@REV], https:// or file://", file=sys.stderr)
        return 2
    print(f"fetched: {source} -> {dest}", flush=True)
    return 0


def ready(url: str, timeout: float, interval: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310
                if resp.status == 200:
                    print(f"ready: {url}", flush=True)
                    return 0
        except (urllib.error.URLError, OSError) as e:
            print(f"waiting: {url} ({e})", flush=True)
        if time.monotonic() >= deadline:
            print(f"error: {url} not ready after {timeout:.0f}s", file=sys.stderr)
            return 1
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait", help="wait for stage manifests")
    w.add_argument("folders", nargs="+", type=Path)
    w.add_argument("--timeout", type=float, default=7 * 24 * 3600)
    w.add_argument("--interval", type=float, default=15)
    f = sub.add_parser("fetch", help="download an input unless present")
    f.add_argument("source")
    f.add_argument("dest", type=Path)
    f.add_argument("--sha256")
    f.add_argument("--repo-type", choices=["model", "dataset"], default="model")
    r = sub.add_parser("ready", help="wait for an HTTP endpoint to answer 200")
    r.add_argument("url")
    r.add_argument("--timeout", type=float, default=3600)
    r.add_argument("--interval", type=float, default=10)
    a = p.parse_args(argv)
    if a.cmd == "wait":
        return wait(a.folders, a.timeout, a.interval)
    if a.cmd == "fetch":
        return fetch(a.source, a.dest, a.sha256, a.repo_type)
    return ready(a.url, a.timeout, a.interval)


if __name__ == "__main__":
    sys.exit(main())
