"""Start the OpenAI-compatible server on a local (or existing) Ray cluster.

    python -m serving --model PATH --port 8000 --host 127.0.0.1          # as with vLLM (or: python -m serving PATH)
    python -m serving --model-id PATH --hostname 0.0.0.0 --port 8080     # TGI's spelling
    python -m serving --config serving/configs/gptq-4gb.yaml [--model PATH] [engine.max_num_seqs=8 port=8001 ...]

Flags set the ServeConfig fields they name (``--max-model-len`` is ``engine.max_model_len``); ``KEY=VALUE``
overrides set any field; a flag wins over the same field in an override or the config file.
Blocks until interrupted; HTTP on ``host:port`` (default 127.0.0.1:8000; the Helm chart sets 0.0.0.0).

API keys: ``API_KEYS`` (comma-separated, or ``--api-key``) is moved into a private 0600 file that the replicas
read (and out of this process's environment); ``API_KEYS_FILE`` names a file of keys (e.g. a Kubernetes Secret
mount). Keys never go into a Ray runtime env: Ray writes runtime envs to its logs.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from training.config import ConfigError

if TYPE_CHECKING:
    from serving.config import ServeConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# vLLM's --dtype spellings -> engine.dtype
DTYPES = {"auto": "auto", "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
          "float32": "float32"}
# flag dest -> ServeConfig field it sets
FLAG_FIELDS = {"host": "host", "port": "port", "served_model_name": "served_model_name", "tokenizer": "tokenizer",
               "chat_template": "chat_template", "max_model_len": "engine.max_model_len",
               "max_num_seqs": "engine.max_num_seqs", "dtype": "engine.dtype", "seed": "engine.seed",
               "gpu_memory_gb": "engine.gpu_memory_gb", "kv_cache_dtype": "engine.kv_cache_dtype",
               "device": "engine.device"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="ServeConfig YAML (see serving/configs/).")
    p.add_argument("--model", "--model-id", dest="model", help="Model folder (overrides `model:` in the config).")
    p.add_argument("--host", "--hostname", dest="host", help="HTTP bind address (host).")
    p.add_argument("--port", type=int, help="HTTP port (port).")
    p.add_argument("--served-model-name", help="Name clients pass as `model` (served_model_name).")
    p.add_argument("--tokenizer", help="Tokenizer folder when it differs from the model's (tokenizer).")
    p.add_argument("--chat-template", help="Jinja chat template, or a file holding one (chat_template).")
    p.add_argument("--max-model-len", "--max-total-tokens", dest="max_model_len", type=int,
                   help="Longest prompt + completion in tokens (engine.max_model_len).")
    p.add_argument("--max-num-seqs", type=int, help="Most sequences decoding at once (engine.max_num_seqs).")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="Weights/activations dtype (engine.dtype).")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], help="engine.kv_cache_dtype.")
    p.add_argument("--gpu-memory-gb", type=float, help="The replica's GPU memory budget in GiB "
                                                       "(engine.gpu_memory_gb).")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="engine.device.")
    p.add_argument("--seed", type=int, help="Seed for requests that give none (engine.seed).")
    p.add_argument("--enforce-eager", action="store_true", help="No CUDA graphs (engine.cuda_graphs=false).")
    p.add_argument("--api-key", help="Require this bearer key (as API_KEYS=KEY; API_KEYS_FILE also works). Visible "
                                     "to `ps` as any argument is: prefer API_KEYS_FILE.")
    p.add_argument("overrides", nargs="*", help="Config overrides, e.g. engine.gpu_memory_gb=4 port=8001; a first "
                                                "argument without '=' is the model folder (vLLM's `serve M`).")
    return p


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags given, as ``field=value`` overrides (values JSON-quoted so YAML reads strings as strings)."""
    out = []
    for dest, key in FLAG_FIELDS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if dest == "dtype":
            value = DTYPES[value]
        elif dest == "chat_template" and Path(value).is_file():
            value = Path(value).read_text(encoding="utf-8")
        out.append(f"{key}={json.dumps(value)}")
    if args.enforce_eager:
        out.append("engine.cuda_graphs=false")
    return out


def load_cli_config(argv: list[str] | None) -> tuple[ServeConfig, argparse.Namespace]:
    """The ServeConfig a command line asks for (raises ``ConfigError`` naming the field)."""
    from serving.config import load_serve_config

    args = parser().parse_intermixed_args(argv)  # `M --port 8000 k=v` and `--port 8000 M k=v` alike
    overrides = list(args.overrides)
    if overrides and "=" not in overrides[0]:
        if args.model is not None:
            raise ConfigError(f"model: given twice ({overrides[0]!r} and --model {args.model!r})")
        args.model = overrides.pop(0)
    return load_serve_config(args.config, overrides + flag_overrides(args), args.model), args


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
    try:
        cfg, args = load_cli_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.api_key:
        os.environ["API_KEYS"] = args.api_key
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
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
        node_ip = cfg.node_ip_address
        if node_ip in LOOPBACK:
            # Ray binds its metrics exporter to the node's address, and turns an explicit 127.0.0.1 into the
            # machine's routable one; its single-node switch (the macOS/Windows default) keeps it on loopback.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        elif node_ip:
            init_kwargs["_node_ip_address"] = node_ip
    import ray  # after the environment above: Ray reads its switches at import
    from ray import serve

    from serving.api_router import build_app

    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE",) if k in os.environ}  # nothing secret: Ray logs it
    ray.init(**init_kwargs, runtime_env={"env_vars": env} if env else None)
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s,
                              "root_path": cfg.root_path})
    serve.run(build_app(cfg), name="llm", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
