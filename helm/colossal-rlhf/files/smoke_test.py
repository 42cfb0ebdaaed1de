"""`helm test` of the colossal-rlhf chart: the API lists the served model and answers one chat completion.

    python smoke_test.py URL MODEL [--api-key-file FILE] [--prompt TEXT] [--wait S] [--interval S]

Standard library only. Until --wait seconds have passed, an unreachable API or a 5xx answer (a pod still loading
its model answers 503 on /ready, or is not there yet) is retried every --interval seconds; a wrong answer fails
at once. Exits 0 on success, 1 with the reason on stderr otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def _call(url: str, key: str | None, body: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=300) as resp:  # noqa: S310 - the release's own Service
        return json.loads(resp.read())


def check(base: str, model: str, key: str | None, prompt: str) -> str:
    """Run both checks; returns the completion text, raises AssertionError or URLError on failure."""
    base = base.rstrip("/")
    models = _call(f"{base}/v1/models", key)
    ids = [m.get("id") for m in models.get("data", [])]
    if model not in ids:
        raise AssertionError(f"/v1/models lists {ids}, not {model!r}")
    reply = _call(f"{base}/v1/chat/completions", key, {
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0})
    choices = reply.get("choices") or []
    if not choices or not isinstance(choices[0].get("message", {}).get("content"), str):
        raise AssertionError(f"chat completion has no message: {json.dumps(reply)[:500]}")
    if reply.get("object") != "chat.completion":
        raise AssertionError(f"object is {reply.get('object')!r}, expected 'chat.completion'")
    return choices[0]["message"]["content"]


def _retryable(e: Exception) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500
    return isinstance(e, urllib.error.URLError | OSError)


def check_until(base: str, model: str, key: str | None, prompt: str, wait: float, interval: float) -> str:
    """``check`` retried on connection errors and 5xx answers until ``wait`` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        try:
            _call(f"{base.rstrip('/')}/ready", key)
            return check(base, model, key, prompt)
        except (urllib.error.URLError, OSError) as e:
            if not _retryable(e) or time.monotonic() + interval > deadline:
                raise
            print(f"not ready yet ({e}); retrying in {interval:.0f}s", flush=True)
            time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("url")
    p.add_argument("model")
    p.add_argument("--api-key-file", type=Path)
    p.add_argument("--prompt", default="Say hello in five words.")
    p.add_argument("--wait", type=float, default=0, help="seconds to keep retrying an API that is not ready yet")
    p.add_argument("--interval", type=float, default=10, help="seconds between two attempts")
    a = p.parse_args(argv)
    key = None
    if a.api_key_file and a.api_key_file.exists():
        key = next((k.strip() for k in a.api_key_file.read_text().splitlines() if k.strip()), None)
    try:
        text = check_until(a.url, a.model, key, a.prompt, a.wait, a.interval)
    except (AssertionError, urllib.error.URLError, OSError, ValueError) as e:
        detail = e.read().decode(errors="replace")[:500] if isinstance(e, urllib.error.HTTPError) else ""
        print(f"FAIL: {e} {detail}".strip(), file=sys.stderr)
        return 1
    print(f"OK: {a.model} answered {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
