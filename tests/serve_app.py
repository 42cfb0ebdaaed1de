"""The real Ray Serve app on localhost for tests: ``running_app`` starts it (local Ray, loopback HTTP) and tears
it down; ``wait_ready`` polls ``/ready``. Wrap test runs that use it in ``flock /tmp/ray-tests.lock``."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:  # openai >= 3 ships its HTTP client as httpx2 (same API as httpx)
    import httpx2 as httpx
except ImportError:
    import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(model: Path, overrides: list[str], env_vars: dict[str, str],
                test_env: dict[str, str] | None = None) -> Iterator[str]:
    """Yields the base URL as soon as the app is deployed (the model may still be loading).

    ``env_vars`` reach the replicas through Ray's runtime env; ``test_env`` is set in this process (the replicas
    started from it inherit it) and restored afterwards."""
    import ray
    import ray.serve._private.api as serve_api  # serve.start waits a fixed 60 s for the proxy
    from ray import serve

    from serving.api_router import build_app
    from serving.config import load_serve_config

    port = free_port()
    cfg = load_serve_config("serving/configs/cpu-small.yaml", [f"port={port}", "host=127.0.0.1", *overrides],
                            model=str(model))
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Ray Serve's proxy gets 5 s to report ready by default: too short on a busy 2-core CI box
    env = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
           **(test_env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    proxy_timeout = serve_api.HTTP_PROXY_TIMEOUT
    serve_api.HTTP_PROXY_TIMEOUT = 600
    for attempt in range(3):  # Ray waits a fixed 30 s for its raylet; an overloaded 2-core box can miss that
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", **env_vars}})
            break
        except Exception:  # noqa: BLE001 - ray raises a bare Exception on a slow start
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name="llm", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        serve_api.HTTP_PROXY_TIMEOUT = proxy_timeout
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_ready(base: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{base}/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.5)
