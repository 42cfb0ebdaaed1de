"""Serving configuration: one pydantic ``ServeConfig`` loaded from YAML with ``key.sub=value`` overrides.

Groups: ``engine`` (model loading, KV cache, memory budget, batching), ``deployment`` (Ray Serve replicas,
resources, admission, autoscaling) and the HTTP/API options at the top level. Unknown keys are rejected.
Example files: ``serving/configs/*.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.request_limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH
from training.artifacts import model_folder
from training.config import ConfigError, load_config

DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_GPU_MEMORY_GB = 4.0
DEFAULT_MAX_NUM_SEQS = 32
DEFAULT_MAX_WAITING = 64
ADMISSION_HEADROOM = 4  # Serve's max_ongoing_requests over the engine's limit: 3x bursts must reach our 429
DEFAULT_ENGINE_STALL_TIMEOUT_S = 30.0
# Chosen by serving.bench_scheduler's counts (loadtest/results/cpu/scheduler_*.json; the numbers are in
# serving.scheduler.Scheduler.admit and pick_victim)
ADMISSION_LOOKAHEAD_TOKENS = 8
PREEMPTION_VICTIM = "least_computed"

__all__ = ["ConfigError", "DeploymentConfig", "EngineConfig", "ServeConfig", "load_serve_config", "resolve_model_path"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class EngineConfig(_Strict):
    """The LLM engine of one replica."""

    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when available, else CPU.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Activation/weight dtype for non-quantized parts. auto: fp16 on CUDA, fp32 on CPU.")
    gpu_memory_gb: float | None = Field(
        DEFAULT_GPU_MEMORY_GB, gt=0,
        description="Budget for the whole replica on the GPU as nvidia-smi counts it: the KV blocks get what "
                    "is left after the process's own NVML figure (CUDA context, libraries, weights, graphs) and a "
                    "prefill reserve. The allocator is also capped with set_per_process_memory_fraction. "
                    "Ignored on CPU. null: no cap (cache sized by kv_cache_tokens or "
                    "max_num_seqs*max_model_len).")
    cpu_kv_cache_gb: float = Field(0.5, gt=0, description="KV cache budget on CPU.")
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt + completion, in tokens. None: the model's own context "
                                 "(max_position_embeddings), limited to what the KV cache budget holds.")
    block_size: int = Field(16, ge=8, le=256, description="Tokens per KV cache block (a power of two).")
    enable_prefix_caching: bool = Field(True, description="Share full KV blocks between requests with the same "
                                        "prefix (multi-turn chat, system prompts); unused ones are evicted LRU.")
    cuda_stack_limit: int | None = Field(
        None, ge=0, description="Bytes of CUDA per-thread stack, set through libcudart before CUDA starts (H200 "
                                "context: 612 MiB by default, 414 at 256, 364 at 64; the driver raises it for a kernel "
                                "that needs more). None: CUDA's default.")
    attention_kernel: Literal["auto", "torch"] = Field(
        "auto", description="Decode attention over blocks. auto: the Triton kernel on CUDA when "
                            "serving.kernels.paged_attention is installed, else torch (gather + SDPA).")
    max_num_seqs: int = Field(DEFAULT_MAX_NUM_SEQS, ge=1, le=256,
                              description="Most sequences decoding at once (upper bound; the budget may allow fewer).")
    max_waiting: int = Field(DEFAULT_MAX_WAITING, ge=0,
                             description="Requests allowed to wait for KV blocks; beyond it the API answers 429.")
    max_prefill_tokens: int = Field(4096, ge=16, description="Prompt tokens prefilled per engine step at most.")
    prefill_chunk: int = Field(256, ge=16, description="Prompt tokens per prefill forward (bounds activation memory).")
    admission_lookahead_tokens: int = Field(
        ADMISSION_LOOKAHEAD_TOKENS, ge=0,
        description="A waiting request is admitted only when the free KV blocks, after its prompt, still cover "
                    "the next this-many tokens of every running sequence and of itself (each bounded by its "
                    "max_tokens), so that running sequences do not grow into each other and preempt (recompute) "
                    "in a loop under memory pressure. With nothing running a request is admitted on its prompt "
                    "alone. 0: admit on the prompt's blocks alone (the first paged engine).")
    preemption_victim: Literal["least_computed", "newest"] = Field(
        PREEMPTION_VICTIM, description="Which running sequence is preempted when blocks run out mid-decode: "
                                       "least_computed (fewest tokens in the cache: the least prefill to redo) or "
                                       "newest (the most recently admitted).")
    kv_cache_dtype: Literal["auto", "int8"] = Field(
        "auto", description="auto: the model dtype. int8: per-token-per-head scaled int8 (half the bytes).")
    kv_cache_tokens: int | None = Field(None, ge=16, description="Fix the KV cache size in tokens instead of sizing "
                                                                 "it from the memory budget.")
    embed_on_host: bool | None = Field(None, description="Keep the embedding table in host memory (saves "
                                                         "vocab*hidden*2 bytes of GPU memory). None: on when a "
                                                         "gpu_memory_gb budget is set.")
    lm_head_int8: bool = Field(False, description="Store lm_head as int8 with per-row scales (half its bytes).")
    lm_head_int4: bool = Field(
        False, description="Store lm_head as 4-bit (round to nearest, groups of 128) through the project's W4A16 "
                           "GEMV: a quarter of fp16's bytes (LLaMA-7B: 66.5 MiB against int8's 125). Its quality "
                           "cost is not measured. Exclusive with lm_head_int8; needs triton (CUDA).")
    vendor_blas: bool = Field(
        True, description="false: no cuBLAS/cuDNN/SDPA anywhere outside the quantized linears (the 4 GB profile): "
                          "the int8 lm_head through the Triton W8A16 kernel, rotary cos/sin without a matmul, prefill "
                          "and decode attention through the Triton paged kernels. The process then never loads those "
                          "libraries' kernels (H200, torch 2.11: +130 MiB outside the allocator for the first cuBLAS "
                          "matmul, +28 MiB for SDPA). Needs triton and lm_head_int8; on CPU the kernels run "
                          "interpreted (tests only).")
    cuda_graphs: bool = Field(True, description="Capture the decode step as CUDA graphs (CUDA only).")
    overlap_decode: bool = Field(False, description="Queue the next decode step on the device before the host "
                                                    "has this step's tokens (it takes them from the device), so the "
                                                    "host's stop checks and bookkeeping run while the GPU computes. "
                                                    "A step whose batch then changed in a way that alters the "
                                                    "computation is computed again. Not with logprobs or "
                                                    "embed_on_host.")
    compile: bool = Field(False, description="torch.compile the decode layer (one program for all layers) to fuse "
                                             "its small element-wise kernels; adds compile time at start-up.")
    fuse_projections: bool = Field(False, description="q/k/v and gate/up as one GEMM each (plain linears, "
                                   "GPTQModel's Marlin layers); each fusion is checked against the separate "
                                   "layers at load.")
    graph_batch_sizes: list[int] = Field([1, 2, 4, 8, 16, 24, 32, 48, 64],
                                         description="Batch-size buckets captured as CUDA graphs.")
    gptq_backend: Literal["auto", "marlin", "exllama_v2", "triton", "torch", "triton_gemv"] = Field(
        "auto", description="GPTQModel kernel for GPTQ checkpoints. auto: torch on CPU; on CUDA marlin for "
        "symmetric 4/8-bit checkpoints, exllama_v2 for asymmetric 4-bit (gptq.sym=false), else triton. "
        "triton_gemv: this project's split-K W4A16 kernels (serving/kernels/w4a16.py; 4-bit, CUDA).")
    warmup: bool = Field(True, description="Run a short generation before reporting ready.")
    seed: int = Field(0, description="Seed for requests that give none.")

    @model_validator(mode="after")
    def _buckets(self) -> EngineConfig:
        if not self.graph_batch_sizes or any(b < 1 for b in self.graph_batch_sizes):
            raise ValueError("graph_batch_sizes must be a non-empty list of positive integers")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.lm_head_int8 and self.lm_head_int4:
            raise ValueError("lm_head_int8 and lm_head_int4 exclude each other: choose one")
        return self

    @classmethod
    def from_config(cls, cfg: object) -> EngineConfig:
        """An ``EngineConfig`` from itself, a dict or another object with the same fields."""
        if isinstance(cls, type) and isinstance(cfg, cls):
            return cfg
        data = cfg.model_dump() if hasattr(cfg, "model_dump") else dict(cfg)
        return cls(**{k: v for k, v in data.items() if k in cls.model_fields})


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling (replaces ``num_replicas``)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(16, gt=0, description="Per-replica load the autoscaler aims for.")
    upscale_delay_s: float = Field(30, ge=0)
    downscale_delay_s: float = Field(600, ge=0)
    metrics_interval_s: float = Field(10, gt=0)

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    def to_ray(self) -> dict:
        return self.model_dump(exclude_none=True)


class DeploymentConfig(_Strict):
    """Ray Serve deployment options of the LLM server."""

    name: str = Field("LLMServer", description="Ray Serve deployment name.")
    num_replicas: int = Field(1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (1 on a GPU node).")
    num_cpus: float = Field(1, ge=0, description="CPUs per replica.")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Ray Serve's per-replica concurrency cap. None: ADMISSION_HEADROOM (4) x the "
                                "engine's admission limit (max_num_seqs + max_waiting), so a burst of 3x the limit "
                                "reaches the replica and gets its 429 at once instead of waiting in Ray's proxy "
                                "(refused requests hold a place for well under a millisecond).")
    max_queued_requests: int | None = Field(
        None, ge=-1, description="Ray Serve's proxy-side queue bound (-1: unbounded, which lets a burst wait for "
                                 "seconds). None: ADMISSION_HEADROOM (4) x the engine's admission limit; past it "
                                 "Ray answers 503 at once.")
    health_check_period_s: float = Field(10, gt=0)
    health_check_timeout_s: float = Field(30, gt=0)
    graceful_shutdown_timeout_s: float = Field(20, ge=0)
    autoscaling: AutoscalingConfig | None = Field(None, description="Set to enable Ray Serve autoscaling.")


class ServeConfig(_Strict):
    """Everything ``python -m serving`` needs."""

    model: str | None = Field(None, description="HF folder, GPTQ folder, or a stage output folder with manifest.json.")
    served_model_name: str | None = Field(None, description="Name clients pass as `model`. Default: folder name.")
    tokenizer: str | None = Field(None, description="Tokenizer folder when it differs from the model folder.")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's.")
    host: str = Field(DEFAULT_HOST, description="HTTP bind address. Loopback by default so a laptop or CI run is "
                                                "not reachable from the network; the Helm chart sets 0.0.0.0.")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    root_path: str = Field("", description="Path prefix when served behind a proxy.")
    docs: bool = Field(False, description="Serve the interactive API pages /docs (Swagger UI) and /redoc. Off by "
                                          "default: public pages that load scripts from a CDN. /openapi.json is "
                                          "always served.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    request_timeout_s: float = Field(600, gt=0, description="Longest a request may run before it is cancelled.")
    ray_address: str | None = Field(None, description="Existing Ray cluster to join (default: start a local one).")
    ray_metrics_export_port: int | None = Field(8080, description="Port where Ray exports Ray Serve's own "
                                                                  "Prometheus metrics (None: Ray's default).")
    ray_node_ip_address: str | None = Field(
        None, description="Address of the local Ray node `python -m serving` starts; Ray binds its metrics exporter "
                          "(ray_metrics_export_port) to it. None: 127.0.0.1 when `host` is a loopback address (so the "
                          "exporter is not public either; Ray then runs single-node, its macOS default), else Ray's "
                          "choice (the machine's address, which the chart's PodMonitor scrapes).")
    api_keys_files: list[str] = Field(
        default_factory=list,
        description="Files of API keys, one per line ('#' comments), re-read when they change: a Kubernetes Secret "
                    "mount, or the private file `python -m serving` writes from env API_KEYS. Keys never travel in "
                    "the config or in a Ray runtime env (Ray logs those). Env API_KEYS_FILE adds one more file.")
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1024, description="Largest request body; bigger ones get a 413 while being read, "
                                                     "before any parsing.")
    max_json_depth: int = Field(DEFAULT_MAX_JSON_DEPTH, ge=4, le=512,
                                description="Deepest JSON nesting accepted in a request body (400 beyond).")
    request_workers: int = Field(
        2, ge=1, le=64, description="Threads that parse, validate and tokenize request bodies, off the event loop "
                                    "that streams tokens and answers the probes.")
    engine_stall_timeout_s: float = Field(
        DEFAULT_ENGINE_STALL_TIMEOUT_S, gt=0,
        description="/health (and Ray's replica health check) fail when the engine loop has not come round for "
                    "this long: a hung loop gets its replica restarted. The idle loop wakes every 0.5 s and a "
                    "decode step takes milliseconds, so 30 s is only ever a hang.")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)

    @property
    def admission_limit(self) -> int:
        """Requests one replica takes at most (running + waiting); the API's own 429 beyond it."""
        return self.engine.max_num_seqs + self.engine.max_waiting

    def serve_limits(self) -> tuple[int, int]:
        """Ray Serve's (max_ongoing_requests, max_queued_requests), derived from the engine's limits unless set."""
        d = self.deployment
        ongoing = d.max_ongoing_requests if d.max_ongoing_requests is not None else \
            ADMISSION_HEADROOM * self.admission_limit
        # Ray counts a request as queued while its router picks a replica, so a burst is briefly "queued" even
        # with room on the replica: at 1x the limit, 3x bursts got Ray's plain-text 503s (seen in
        # tests/cpu/test_serving_hostile.py); at 4x they all reach the replica's 429.
        queued = d.max_queued_requests if d.max_queued_requests is not None else \
            ADMISSION_HEADROOM * self.admission_limit
        return ongoing, queued

    @property
    def node_ip_address(self) -> str | None:
        if self.ray_node_ip_address is not None:
            return self.ray_node_ip_address
        return "127.0.0.1" if self.host in ("127.0.0.1", "localhost", "::1") else None

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model or "model").resolve().name


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A model folder, or a stage output folder whose manifest names the model folder (training's one lookup)."""
    return model_folder(path, "model")


def load_serve_config(path: str | None, overrides: list[str] | None = None, model: str | None = None) -> ServeConfig:
    cfg = load_config(ServeConfig, path, overrides)
    if model is not None:
        cfg.model = model
    if not cfg.model:
        raise ConfigError("model: required (set `model:` in the config or pass --model PATH)")
    resolve_model_path(cfg.model)
    return cfg
