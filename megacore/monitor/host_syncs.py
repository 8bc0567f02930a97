"""Host synchronisations: each time the host reads a value computed on the device, it waits for every
kernel queued before it, and the device then idles until the host queues more work. The train step
makes none (megacore/train/trainer.py); this module counts them.

Two views: `HostSyncCounter`, a dispatch mode for tests and benchmarks, counts reads of tensor values
(`item()`, `float()`, `int()`, `bool()` of a tensor: aten._local_scalar_dense; `tolist()`; copies
from a CUDA tensor to the CPU). `count_in_profile` counts the same in a torch.profiler trace: on CUDA
the runtime's synchronize calls, on CPU the scalar reads (tolist is not visible there).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}
PROFILE_SYNC_EVENTS_CUDA = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


class HostSyncCounter(TorchDispatchMode):
    """with HostSyncCounter() as c: ...; c.count, c.where (the op of each read)."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    @property
    def count(self) -> int:
        return len(self.where)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t, *args, **kwargs):
            counter.where.append("tolist")
            return counter._tolist(t, *args, **kwargs)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SCALAR_READ:
            self.where.append(str(func))
        elif func in _COPIES and _device_to_host(func, args, kwargs):
            self.where.append(str(func))
        return func(*args, **kwargs)


def _device_to_host(func, args, kwargs) -> bool:
    if func is torch.ops.aten.copy_.default:  # copy_(dst, src)
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu"
    src, target = args[0], kwargs.get("device")
    return src.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


def count_in_profile(events, device_type: str) -> int:
    """Host syncs among torch.profiler events. Left out on CPU, as host bookkeeping rather than waits
    on a device: reads inside a collective's own work (gloo), and the CPU fused AdamW kernel reading its
    step counters (CPU tensors; on CUDA the kernel reads them on the device)."""
    if device_type == "cuda":
        return sum(1 for e in events if e.name in PROFILE_SYNC_EVENTS_CUDA)
    return sum(1 for e in events if e.name == "aten::_local_scalar_dense" and not _inside_collective(e))


def _inside_collective(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(("gloo:", "c10d::", "nccl:")) or parent.name in ("record_param_comms",
                                                                                    "aten::_fused_adamw_"):
            return True
        parent = parent.cpu_parent
    return False
