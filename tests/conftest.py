"""Shared fixtures: a tiny random Llama with a real (small) BPE tokenizer and a chat template."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Triton reads TRITON_INTERPRET when a jit function is decorated, its own standard library's included, so it must
# be set before anything imports triton (torch.compile does, in the engine tests): set once here, for the whole
# session, on machines without CUDA, where every Triton kernel a test runs goes through the interpreter.
if not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

CORPUS = [
    "Hello, how are you today? I am fine, thank you.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Write a short poem about the sea. The sea is wide and blue.",
    "What is two plus two? Two plus two is four.",
    "你好，今天天气很好。我们去公园散步吧。",
    "Reward models rank answers; PPO improves the policy.",
]


def make_tokenizer(out: Path):
    """A byte-level BPE tokenizer with ChatML special tokens, saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from training.data import DEFAULT_CHAT_TEMPLATE

    specials = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def make_tiny_llama(out: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Random-weight Llama at a toy shape with the tokenizer above: for mechanics, never quality."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_stage(module: str, config: Path, *extra: str, env: dict[str, str] | None = None,
              check: bool = True, nproc: int = 0) -> subprocess.CompletedProcess:
    """Run a stage CLI in a fresh process, as a Kubernetes Job would (under torchrun when ``nproc`` > 0)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc else [sys.executable]
    proc = subprocess.run([*launcher, "-m", module, "--config", str(config), *extra], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc
