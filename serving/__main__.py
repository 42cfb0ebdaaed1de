"""Start the OpenAI-compatible server on a local (or existing) Ray cluster.

    python -m serving --config serving/configs/gptq-4gb.yaml [--model PATH] [engine.max_num_seqs=8 ...]

Blocks until interrupted; HTTP on ``host:port`` (default 0.0.0.0:8000).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from training.config import ConfigError


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

    init_kwargs = {"address": cfg.ray_address} if cfg.ray_address else {}
    if not cfg.ray_address and cfg.ray_metrics_export_port:
        init_kwargs["_metrics_export_port"] = cfg.ray_metrics_export_port
    ray.init(**init_kwargs, runtime_env={"env_vars": {k: os.environ[k] for k in ("API_KEYS", "API_KEYS_FILE",
                                                                               "HF_HUB_OFFLINE") if k in os.environ}})
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s,
                              "root_path": cfg.root_path})
    serve.run(build_app(cfg), name="llm", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
