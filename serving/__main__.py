"""Start the OpenAI-compatible server on a local (or existing) Ray cluster.

    python -m serving --config serving/configs/gptq-4gb.yaml [--model PATH] [engine.max_num_seqs=8 ...]

Blocks until interrupted; HTTP on ``host:port`` (default 127.0.0.1:8000; the Helm chart sets 0.0.0.0).

API keys: ``API_KEYS`` (comma-separated) is moved into a private 0600 file that the replicas read (and out of
this process's environment), ``API_KEYS_FILE`` names a file of keys (e.g. a Kubernetes Secret mount). Keys
never go into a Ray runtime env: Ray writes runtime envs to its logs.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from training.config import ConfigError


def keys_file_from_env() -> str | None:
    """Move env ``API_KEYS`` into a new 0600 file in a 0700 folder (removed at exit) and return its path.

    Popped from ``os.environ`` before Ray starts, so neither Ray's logs nor the environment its processes
    inherit hold a key."""
    keys = [k.strip() for k in os.environ.pop("API_KEYS", "").split(",") if k.strip()]
    if not keys:
        return None
    folder = tempfile.mkdtemp(prefix="serving-keys-")
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder) / "api-keys"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(keys) + "\n")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="ServeConfig YAML (see serving/configs/).")
    p.add_argument("--model", help="Model folder (overrides `model:` in the config).")
    p.add_argument("overrides", nargs="*", help="Config overrides, e.g. engine.gpu_memory_gb=4 port=8001")
    args = p.parse_args(argv)
    from serving.config import load_serve_config

    try:
        cfg = load_serve_config(args.config, args.overrides, args.model)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import ray
    from ray import serve

    from serving.api_router import build_app

    files = list(cfg.api_keys_files)
    if os.environ.get("API_KEYS_FILE"):
        files.append(os.path.abspath(os.environ["API_KEYS_FILE"]))
    written = keys_file_from_env()
    if written:
        files.append(written)
        if cfg.ray_address:
            logging.getLogger("serving").warning("API_KEYS went to %s on this machine only; replicas on other nodes "
                                                 "need API_KEYS_FILE on a path every node has (a Secret mount)",
                                                 written)
    cfg.api_keys_files = files
    init_kwargs: dict = {"address": cfg.ray_address} if cfg.ray_address else {}
    if not cfg.ray_address:
        if cfg.ray_metrics_export_port:
            init_kwargs["_metrics_export_port"] = cfg.ray_metrics_export_port
        if cfg.node_ip_address:  # Ray binds its metrics exporter to the node's address (loopback: not public)
            init_kwargs["_node_ip_address"] = cfg.node_ip_address
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE",) if k in os.environ}  # nothing secret: Ray logs it
    ray.init(**init_kwargs, runtime_env={"env_vars": env} if env else None)
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s,
                              "root_path": cfg.root_path})
    serve.run(build_app(cfg), name="llm", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
