"""Where a replica's GPU memory goes, as one typed ``MemoryReport`` (the start-up log, ``/ready`` and the bench
print the same object), and the process-level settings that must happen before CUDA starts.

"Fits 4 GB" means the whole process as nvidia-smi shows it, not PyTorch's allocator: the CUDA context, module
images and library handles (cuBLAS, cuDNN) live outside the allocator (H200, torch 2.11: bare context 612 MiB,
414 MiB with a 256-byte stack limit; cuBLAS + SDPA add 130-160 MiB). ``process_gpu_mib`` reads that figure from
NVML (``pynvml`` when installed, else ``nvidia-smi``) for this process; the engine sizes the KV cache from it.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger("serving.memory")
MIB = 1024**2

# Under a per-process cap the default allocator strands hundreds of MiB in partly used segments (measured at
# 4 GiB: 305 MiB reserved but unallocated, and the CUDA graphs no longer fitted); expandable segments grow and
# shrink one mapping instead. GPTQModel sets its own value only when none is set.
ALLOC_CONF = "expandable_segments:True"


@dataclass
class MemoryReport:
    """GPU memory of one replica in MiB (all 0 on CPU). ``outside_allocator`` = what NVML shows for the process
    minus what PyTorch's allocator has reserved: CUDA context, kernels' module images, library workspaces."""

    device: str = "cpu"
    budget: int | None = None
    weights: int = 0
    kv_cache: int = 0
    kv_blocks: int = 0
    block_size: int = 0
    kv_tokens: int = 0
    kv_bytes_per_token: int = 0
    workspaces: int = 0  # allocated beyond weights and cache (embedding staging, lm_head chunks, buffers)
    activation_reserve: int = 0  # kept free for the largest prefill chunk's transient peak
    graph_pool: int = 0
    reserved: int = 0
    allocated: int = 0
    outside_allocator: int | None = None
    process_nvml: int | None = None  # the whole process as nvidia-smi sees it (None: not readable)
    nvml_source: str | None = None
    cuda_stack_limit: int | None = None
    # the process after each load step, in order: [step, nvml MiB (None: not readable / CPU), allocator allocated
    # MiB, allocator reserved MiB]; steps: context, weights, lm_head (the runner built: int8 lm_head, host
    # embedding), first_prefill, kv_cache, first_decode, graphs, fitted, warmed_up (a retried fit repeats
    # kv_cache .. graphs with "#2", "#3")
    steps: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_alloc_conf() -> None:
    """Expandable segments for the CUDA allocator unless the user set a value; must run before CUDA starts."""
    if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_ALLOC_CONF"] = ALLOC_CONF


def _libcudart() -> ctypes.CDLL | None:
    import torch

    base = os.path.dirname(torch.__file__)
    for pattern in ("../nvidia/*/lib/libcudart.so*", "../nvidia/cuda_runtime/lib/libcudart.so*", "lib/libcudart*"):
        for path in sorted(glob.glob(os.path.join(base, pattern))):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def set_cuda_stack_limit(device_index: int, stack_bytes: int) -> int | None:
    """``cudaDeviceSetLimit(cudaLimitStackSize, stack_bytes)`` through libcudart before torch's first CUDA call,
    so torch then uses this primary context (H200: a bare context 612 -> 414 MiB). The limit is per-thread local
    memory reserved on every SM; 256 bytes suffices for the kernels the engine runs (measured on the H200: the
    bench's decode and prefill at 256). Returns the limit read back, or None when it could not be set."""
    import torch

    if torch.cuda.is_initialized():
        logger.warning("cuda_stack_limit ignored: CUDA was already initialized in this process")
        return None
    rt = _libcudart()
    if rt is None:
        logger.warning("cuda_stack_limit ignored: libcudart not found")
        return None
    if rt.cudaSetDevice(ctypes.c_int(device_index)) != 0:
        return None
    rc = rt.cudaDeviceSetLimit(ctypes.c_int(0), ctypes.c_size_t(stack_bytes))  # 0 = cudaLimitStackSize
    if rc != 0:
        logger.warning("cudaDeviceSetLimit(cudaLimitStackSize, %d) returned %d", stack_bytes, rc)
        return None
    return cuda_stack_limit(rt)


def cuda_stack_limit(rt: ctypes.CDLL | None = None) -> int | None:
    """The CUDA stack limit now (``cudaDeviceGetLimit``; the driver raises it for a kernel that needs more), or
    None when libcudart is missing or refuses."""
    rt = rt or _libcudart()
    if rt is None:
        return None
    value = ctypes.c_size_t()
    return int(value.value) if rt.cudaDeviceGetLimit(ctypes.byref(value), ctypes.c_int(0)) == 0 else None


def process_gpu_mib(device_index: int = 0) -> tuple[int | None, str | None]:
    """This process's GPU memory in MiB as nvidia-smi shows it, and where it came from. Where the process is not
    listed (a container's pid namespace), None."""
    pid = os.getpid()
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(_physical_index(device_index))
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory) // MIB, "nvml"
        return None, "nvml"
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001 - NVML missing or refusing: fall back to nvidia-smi
        logger.debug("pynvml failed: %s", e)
    apps = compute_apps_mib()
    return (None, None) if apps is None else (apps.get(pid), "nvidia-smi")


def compute_apps_mib() -> dict[int, int] | None:
    """MiB per compute process as nvidia-smi lists them (summed over GPUs), or None where it cannot run."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    apps: dict[int, int] = {}
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            apps[int(parts[0])] = apps.get(int(parts[0]), 0) + int(parts[1])
    return apps


def _physical_index(index: int) -> int:
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis:
        ids = [x.strip() for x in vis.split(",")]
        if index < len(ids) and ids[index].isdigit():
            return int(ids[index])
    return index
