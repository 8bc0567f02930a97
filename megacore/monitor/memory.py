"""Memory a rank really holds: parameter, gradient and optimizer bytes of its local shards, and its peak."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from data_pipeline.durable import write_json_atomic
from megacore.train.hooks import Hook


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


def resident_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# Runs its arguments as its only child, then prints that child's peak resident set size (bytes) last.
_PEAK_OF_CHILD = ("import resource, subprocess, sys; status = subprocess.run(sys.argv[1:]).returncode; "
                  "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(status)")


def peak_resident_of(argv: list[str], **run_kwargs) -> tuple[int, subprocess.CompletedProcess]:
    """(peak resident bytes, the completed process, its stdout without the measurement) of the command
    `argv`, run as the only child of a fresh wrapper process (so no other child of the caller counts:
    ru_maxrss of RUSAGE_CHILDREN is the largest child ever waited for). Output is captured as text."""
    proc = subprocess.run([sys.executable, "-c", _PEAK_OF_CHILD, *argv], capture_output=True, text=True,
                          **run_kwargs)
    *output, peak = proc.stdout.splitlines(keepends=True) or ["0"]
    proc.stdout = "".join(output)
    return int(peak), proc


def write_memory_report(path: Path, parts, optimizers, is_main: bool, resident_before_model: int | None = None,
                        peak_after_model: int | None = None) -> None:
    """Gather every rank's real bytes into RUN_DIR/memory.json: local shards, the process's peak resident
    memory so far, its resident memory before the model was built, and its peak once the model was built
    and its weights initialised or loaded (before the first step)."""
    mine = {**local_memory(parts, optimizers), "peak_resident": peak_resident_bytes(),
            "resident_before_model": resident_before_model, "peak_resident_after_model": peak_after_model}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if is_main:
        write_json_atomic(path, {"ranks": [dict(rank=r, **m) for r, m in enumerate(everyone)]})


class MemoryReport(Hook):
    """RUN_DIR/memory.json after the first step of each invocation, while the gradients are still held,
    and again after its last step (the peaks then cover every step)."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main, self.written = path, is_main, False

    def after_step(self, trainer, step: int, result) -> None:
        if not self.written or step == trainer.end_step:
            write_memory_report(self.path, trainer.module.parts, trainer.module.optimizers, self.is_main,
                                trainer.resident_before_model, trainer.peak_after_model)
            self.written = True


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_allocated_during(fn, device: torch.device) -> int:
    """Peak bytes allocated by torch while fn() runs, above what was allocated before: CUDA's allocator
    statistics on a GPU; on a CPU torch.profiler's memory events (the CPU allocator's running total)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals) - totals[0] if totals else 0
