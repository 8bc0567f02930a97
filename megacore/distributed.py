"""Process-group setup: torchrun's environment when present, otherwise a one-process group.

Every run, even a single process, goes through torch.distributed, so there is one code path for
collectives and for sharded checkpoints.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megacore.errors import USER_ERRORS, ConfigError

# See launcher/torchrun.py (TORCHRUN_ENV): without it, a torchrun restart can reuse stale store keys.
RESTART_WARNING = ("warning: torchrun --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a restarted group "
                   "may fail to connect (stale keys in the shared store); megacore's launchers set it")


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> DistEnv:
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available (set train.device=cpu or auto)")
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                    and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0 and rank == 0):
                print(RESTART_WARNING, file=sys.stderr, flush=True)
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        else:
            # Not under torchrun: a private one-process group, no network port needed.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(rank, local_rank, world_size, device)


def shutdown() -> None:
    """Destroy the process group, after collecting garbage: models, engines and loaders no longer
    referenced (cyclic references: DeepSpeed's engine, process subgroups, DTensor meshes) are freed while
    the group exists, not by the interpreter at exit after it is gone (gloo then aborts the process:
    "terminate called without an active exception"). Callers drop their references first."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
    """Sums over ranks, read back to the host (a device sync: for evaluation, not the train step)."""
    t = values.to(device, torch.float64) if isinstance(values, torch.Tensor) else \
        torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def host_all_reduce_sum(values: list[int]) -> list[int]:
    """Sums over ranks of host-side integers (token counts from the loader, stop votes) through a CPU
    tensor: on CUDA jobs the process group's gloo side carries it, so the GPU is never waited on."""
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t)
    return t.numpy().tolist()


def first_failing_rank(failed: bool, device: torch.device) -> int | None:
    """The lowest rank that reports `failed`, or None: every rank learns whether (and where) a step failed."""
    world = dist.get_world_size()
    t = torch.tensor([dist.get_rank() if failed else world], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    first = int(t.item())
    return None if first == world else first


def on_every_rank(build, env: DistEnv):
    """`build()` on every rank; if it raises an error the user can act on anywhere, the lowest such rank
    re-raises it (the one message) and every other rank exits 2 quietly: no rank is left waiting. Every
    rank must call it at the same point (it ends in a collective)."""
    try:
        result, error = build(), None
    except USER_ERRORS as e:
        result, error = None, e
    first = first_failing_rank(error is not None, env.device)
    if first is None:
        return result
    if first == env.rank:
        raise error
    raise SystemExit(2)
