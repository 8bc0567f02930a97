"""Throughput accounting: the matmul peak MFU is measured against, and the real per-rank memory."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.5) -> float:
    """Sustained TFLOP/s of a square matmul on this rank (its threads, its device), measured now.

    On CPU this is the realistic peak for MFU: a vendor number would ignore the clock and threads the
    rank actually has. The best of several short bursts, because a shared machine only ever slows a
    burst down. On GPUs give train.peak_tflops (e.g. 989 for H100 bf16 dense) instead.
    """
    n = 1024 if device.type == "cpu" and dtype != torch.float32 else 2048  # bf16 crawls on CPUs without bf16 units
    # A private generator: the training streams (dropout) must not depend on whether this ran.
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    a @ b  # warm-up

    def burst() -> float:
        iters, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 5:
            a @ b
            iters += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
        return 2 * n**3 * iters / elapsed / 1e12

    best, deadline = 0.0, time.perf_counter() + seconds
    while not best or time.perf_counter() < deadline:  # a slow dtype gets one burst, not five
        best = max(best, burst())
    return best


def _local_numel(t: torch.Tensor) -> int:
    if isinstance(t, DTensor):
        return t.to_local().numel()
    # A ZeRO-3 parameter keeps only its partition (ds_tensor) between uses.
    return t.ds_tensor.numel() if hasattr(t, "ds_tensor") else t.numel()


def local_memory(parts, optimizers) -> dict[str, int]:
    """Bytes this rank really holds in parameters, gradients and optimizer state (local shards)."""
    params = [p for part in parts for p in part.parameters()]
    out = {"parameters": sum(_local_numel(p) * p.element_size() for p in params),
           "gradients": sum(_local_numel(p.grad) * p.grad.element_size() for p in params if p.grad is not None),
           "optimizer": 0}
    for opt in optimizers.optimizers:
        for state in opt.state.values():
            out["optimizer"] += sum(_local_numel(v) * v.element_size() for v in state.values()
                                    if isinstance(v, torch.Tensor))
    return out


def write_memory_report(path: Path, parts, optimizers, is_main: bool) -> None:
    """Gather every rank's real bytes into RUN_DIR/memory.json (once, after the first step)."""
    mine = local_memory(parts, optimizers)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if is_main:
        path.write_text(json.dumps({"ranks": [dict(rank=r, **m) for r, m in enumerate(everyone)]}, indent=2))


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
