"""Loading models and tokenizers from local folders or GGUF files, LoRA, and export.

The policy is any ``AutoModelForCausalLM``. The reward model and the critic are the same
architecture's ``AutoModelForTokenClassification`` with one label: a scalar value per token,
a standard Hugging Face class, so their folders load with ``from_pretrained`` anywhere.
The reward of a sequence is the value at its last real token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.artifacts import is_stage_folder, stage_model
from training.config import ConfigError, ModelConfig


def _locate(cfg: ModelConfig) -> tuple[str, str | None]:
    """(folder, gguf file name or None) for a folder or a ``.gguf`` path."""
    path = Path(cfg.path)
    if not path.exists():
        raise ConfigError(f"model.path: {cfg.path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"model.path: {cfg.path} is a file but not a .gguf; give a model folder or a .gguf")
        return str(path.parent), path.name
    if cfg.gguf_file:
        return str(path), cfg.gguf_file
    if is_stage_folder(path):
        return _locate(cfg.model_copy(update={"path": str(stage_model(path, "model.path"))}))
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
        raise ConfigError(f"model.path: {cfg.path} has no config.json (not a Hugging Face model folder)")
    return str(path), None


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's tokenizer with a chat template and a pad token guaranteed."""
    from transformers import AutoTokenizer

    from training.data import ensure_chat_template

    folder, gguf = _locate(cfg)
    source = cfg.tokenizer_path or folder
    kwargs = {"gguf_file": gguf} if gguf and not cfg.tokenizer_path else {}
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.tokenizer_path: cannot load a tokenizer from {source}: {e}") from e
    ensure_chat_template(tok, cfg.chat_template)
    return tok


def _from_pretrained(auto_cls: Any, cfg: ModelConfig, **extra: Any) -> nn.Module:
    folder, gguf = _locate(cfg)
    kwargs: dict[str, Any] = {"dtype": torch.float32, **extra}
    if gguf:
        kwargs["gguf_file"] = gguf
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        return auto_cls.from_pretrained(folder, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "does not support" in str(e):
            raise ConfigError(f"model.path: {cfg.path}: {auto_cls.__name__} does not support this architecture "
                              f"({e})") from e
        raise


def prepare(model: nn.Module, cfg: ModelConfig, *, trainable: bool = True, task: str = "CAUSAL_LM") -> nn.Module:
    """Apply gradient checkpointing and LoRA as configured."""
    if not trainable:
        return model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules, task_type=task,
                          modules_to_save=["score"] if task == "TOKEN_CLS" else None)
        model = get_peft_model(model, lora)
    return model


def load_policy(cfg: ModelConfig, *, trainable: bool = True) -> nn.Module:
    """A causal LM (SFT model, PPO actor, or PPO reference when ``trainable=False``)."""
    from transformers import AutoModelForCausalLM

    return prepare(_from_pretrained(AutoModelForCausalLM, cfg), cfg, trainable=trainable)


def load_value_model(cfg: ModelConfig, *, trainable: bool = True) -> nn.Module:
    """A per-token scalar head on the backbone: reward model or critic.

    From a causal LM folder the head is new; from an RM folder it is loaded.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    folder, gguf = _locate(cfg)
    config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    config.num_labels, config.classifier_dropout = 1, 0.0  # a deterministic scalar head
    model = _from_pretrained(AutoModelForTokenClassification, cfg, config=config)
    model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return prepare(model, cfg, trainable=trainable, task="TOKEN_CLS")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so left-padded rows start at 0 like right-padded ones."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token scalar values, shape [batch, seq] (left or right padding)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return out.logits.squeeze(-1).float()


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The value at each row's last real token (left or right padding)."""
    idx = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (attention_mask.long() * (idx + 1)).argmax(dim=1)
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, train


def merged_for_export(model: nn.Module) -> nn.Module:
    """The plain transformers model to save: LoRA merged in, wrappers removed."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return model
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
