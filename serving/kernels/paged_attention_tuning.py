"""Launch parameters of the Triton decode kernel: the default rule and the table the GPU bench tunes.

``tests/gpu/bench_paged_attention.py`` measures every candidate inside CUDA graphs and writes the fastest per
shape as JSON (``DecodeTuning.save``). Committed as ``serving/kernels/tuning/<device slug>.json`` (e.g.
``nvidia-h200.json`` for "NVIDIA H200"), a table is found by ``packaged_tuning`` and used by every decode call
on that GPU that brings no config of its own; elsewhere ``default_config`` applies.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

TUNING_DIR = Path(__file__).parent / "tuning"

# splits of the context only pay while the grid is short of the GPU: stop at about two programs per SM
# (H200: 132 SMs) and at 128 tokens a split (below that the merge costs more than the parallelism gives)
PROGRAMS_PER_SM = 2
MIN_TOKENS_PER_SPLIT = 128
MAX_SPLITS = 64
# Multiply-adds instead of tl.dot, only for one query head per kv head (MHA) and only when tuned: compiled for sm_90
# with triton 3.6 that path holds 80-245 registers (tl.dot: 57-145) and its loads are not pipelined (tl.dot's are,
# with cp.async); a group of 2 reaches 255 registers and spills. The default stays tl.dot; the bench tries both.
MAX_FMA_GROUP = 1


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel. ``num_splits`` is an upper bound: the split length is rounded up
    to whole ``block_n`` tiles, which may leave fewer splits (``split_plan``)."""

    num_splits: int = 1
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    use_dot: bool = True  # False: multiply-adds for one query head per kv head (no padding to 16 rows)

    def __post_init__(self):
        for name in ("num_splits", "block_n", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecodeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"DecodeConfig.block_n must be a power of two >= 16 (tl.dot), got {self.block_n}")


def split_plan(max_context: int, config: DecodeConfig) -> tuple[int, int]:
    """(tokens per split, splits) over ``max_context`` tokens: each split holds whole ``block_n`` tiles."""
    want = max(1, min(config.num_splits, math.ceil(max_context / config.block_n)))
    per = math.ceil(math.ceil(max_context / want) / config.block_n) * config.block_n
    return per, math.ceil(max_context / per)


def default_config(batch: int, kv_heads: int, max_context: int, sm_count: int) -> DecodeConfig:
    """Power-of-two splits while the grid has fewer than ``PROGRAMS_PER_SM`` programs per SM."""
    splits = 1
    while (splits * 2 <= MAX_SPLITS and batch * kv_heads * splits * 2 <= PROGRAMS_PER_SM * sm_count
           and max_context / (splits * 2) >= MIN_TOKENS_PER_SPLIT):
        splits *= 2
    return DecodeConfig(num_splits=splits)


@dataclass(frozen=True)
class TunedShape:
    """One measured shape and the fastest configuration found for it."""

    batch: int
    kv_heads: int
    group: int
    max_context: int
    int8: bool
    config: DecodeConfig
    us: float | None = None

    def distance(self, batch: int, kv_heads: int, group: int, max_context: int) -> float:
        # the grid (batch * kv_heads) and the context set the split count; the group matters less
        return (abs(math.log2(batch * kv_heads / (self.batch * self.kv_heads)))
                + abs(math.log2(max_context / self.max_context)) + 0.5 * abs(math.log2(group / self.group)))


@dataclass
class DecodeTuning:
    """The tuned table of one GPU: the nearest measured shape (same int8-ness) gives the configuration."""

    device: str = ""
    entries: list[TunedShape] = field(default_factory=list)

    def config_for(self, batch: int, kv_heads: int, group: int, max_context: int, int8: bool,
                   sm_count: int) -> DecodeConfig:
        same = [e for e in self.entries if e.int8 == int8]
        if not same:
            return default_config(batch, kv_heads, max_context, sm_count)
        return min(same, key=lambda e: e.distance(batch, kv_heads, group, max_context)).config

    def to_json(self) -> dict:
        return {"device": self.device, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_json(cls, data: dict) -> DecodeTuning:
        try:
            entries = [TunedShape(**{**e, "config": DecodeConfig(**e["config"])}) for e in data["entries"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"paged attention tuning table: bad entry ({e})") from e
        return cls(device=data.get("device", ""), entries=entries)

    @classmethod
    def load(cls, path: str | Path) -> DecodeTuning:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"paged attention tuning table {path}: {e}") from e
        return cls.from_json(data)

    def save(self, path: str | Path) -> None:
        """Atomic write: a crash leaves the old table or the new one, never half of one."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the table is read by whoever serves
        os.replace(tmp, path)


def device_slug(device_name: str) -> str:
    """"NVIDIA H200" -> "nvidia-h200": the file name of a device's table."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


@functools.cache
def packaged_tuning(device_name: str, directory: Path = TUNING_DIR) -> DecodeTuning | None:
    """The committed table for this device, read once per process; None when there is none."""
    path = directory / f"{device_slug(device_name)}.json"
    return DecodeTuning.load(path) if path.is_file() else None
