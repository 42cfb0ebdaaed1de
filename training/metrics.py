"""Metrics for practitioners: JSONL and TensorBoard on rank 0, a progress bar, throughput and MFU."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from training import engine

# Dense bf16 peak of one GPU, for MFU. Unknown devices report no MFU rather than a guess.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def train_flops_per_token(model_config: Any, n_params: int, seq_len: int) -> float:
    """6N for the matmuls (forward + backward) plus attention's 12 * layers * hidden * seq."""
    layers = getattr(model_config, "num_hidden_layers", 0)
    hidden = getattr(model_config, "hidden_size", 0)
    return 6 * n_params + 12 * layers * hidden * seq_len


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path, *, tensorboard: bool, progress: bool, total_steps: int,
                 initial_step: int = 0, desc: str = "train"):
        self.main = engine.is_main()
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        self.last: dict[str, Any] = {}
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                self.tb = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the log matches an uninterrupted run."""
        if not self.main or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, Any], *, split: str = "train") -> None:
        clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
        self.last.update({f"{split}/{k}" if split != "train" else k: v for k, v in clean.items()})
        if not self.main:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3), **clean}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, step)
        if self.bar is not None and split == "train":
            shown = {k: clean[k] for k in ("loss", "reward", "acc", "lr") if k in clean}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def read_metrics(output_dir: str | Path, split: str = "train") -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == split]


class Throughput:
    """Tokens/s and MFU over the steps since the last report."""

    def __init__(self, device: torch.device, flops_per_token: float):
        self.device = device
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device)
        self.t0 = time.perf_counter()
        self.tokens: int | torch.Tensor = 0
        self.steps = 0

    def add(self, tokens: int | torch.Tensor, steps: int = 0) -> None:
        """Count tokens (a device tensor is summed on the device and read at ``report``)."""
        self.tokens += tokens
        self.steps += steps

    def report(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tokens = engine.all_reduce_mean(self.tokens, self.device) * engine.world_size()
        out = {"tokens_per_s": tokens / dt, "step_time_s": dt / max(self.steps, 1),
               "peak_mem_gib": engine.peak_memory_gib(self.device)}
        if self.peak:
            out["mfu"] = tokens * self.flops_per_token / dt / (self.peak * engine.world_size())
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.steps = 0
        return out
