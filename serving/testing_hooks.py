"""Test-only hooks, active only when their environment variable is set (tests/cpu/test_serving_hostile.py).

``SERVING_TEST_LOOP_CONTROL_FILE=PATH``: at every iteration of the engine's scheduler loop (through the
metrics callback the loop calls), the file's content decides: ``hang`` holds the loop there while it says so
(a stuck engine, for the /health watchdog), a number sleeps that many seconds (slow decode steps, to keep
streams running); no file, nothing. The replica reads the variable once at start-up.

``SERVING_TEST_RAISE_FOR_USER=NAME``: a request whose ``user`` field is NAME raises a RuntimeError while it is
prepared (a stand-in for a bug), to show that an unexpected exception becomes a counted, logged 500.
"""

import os
import time
from typing import Any

LOOP_CONTROL_ENV = "SERVING_TEST_LOOP_CONTROL_FILE"
RAISE_FOR_USER_ENV = "SERVING_TEST_RAISE_FOR_USER"


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def install(metrics: Any, servings: list[Any]) -> None:
    user = os.environ.get(RAISE_FOR_USER_ENV)
    if user:
        for serving in servings:
            _raise_for_user(serving, user)
    path = os.environ.get(LOOP_CONTROL_ENV)
    if path:
        _control_loop(metrics, path)


def _raise_for_user(serving: Any, user: str) -> None:
    parse = serving.parse

    def parse_or_raise(body: Any) -> Any:
        req = parse(body)
        if req.user == user:
            raise RuntimeError(f"test hook: {RAISE_FOR_USER_ENV} matched")
        return req

    serving.parse = parse_or_raise


def _control_loop(metrics: Any, path: str) -> None:
    on_step = metrics.on_step

    def controlled(*args: Any, **kwargs: Any) -> None:
        while (word := _read(path)) == "hang":
            time.sleep(0.05)
        if word:
            try:
                time.sleep(float(word))
            except ValueError:
                pass
        on_step(*args, **kwargs)

    metrics.on_step = controlled
