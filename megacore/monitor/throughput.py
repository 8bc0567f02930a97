"""Throughput: tokens/s over a window of training steps, and the peak that MFU is measured against.

The window counts training time only: evaluation and checkpoint saves run inside `meter.paused()`,
so tokens/s after an eval or a save step is the speed of training, not of everything around it.
"""

from __future__ import annotations

import contextlib
import time

import torch


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.5) -> float:
    """Sustained TFLOP/s of a square matmul on this rank (its threads, its device), measured now.

    On CPU this is the realistic peak for MFU (a vendor number would ignore the clock and threads the rank
    actually has), and it must not depend on what else runs at start: the matmul runs on one thread,
    timed by that thread's CPU time (time spent waiting for a core is not counted), and the rate is
    multiplied by the rank's threads. On GPUs the wall clock, synchronised. The best of several short
    bursts, because a shared machine only ever slows a burst down.
    """
    cpu = device.type == "cpu"
    n = 1024 if cpu and dtype != torch.float32 else 2048  # bf16 crawls on CPUs without bf16 units
    # A private generator: the training streams (dropout) must not depend on whether this ran.
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    threads = torch.get_num_threads()
    clock = time.thread_time if cpu else time.perf_counter
    if cpu:
        torch.set_num_threads(1)

    def burst() -> float:
        iters, start = 0, clock()
        while (elapsed := clock() - start) < seconds / 5:
            a @ b
            iters += 1
            if not cpu:
                torch.cuda.synchronize()
        return 2 * n**3 * iters / elapsed / 1e12

    try:
        a @ b  # warm-up
        best, deadline = 0.0, clock() + seconds
        while not best or clock() < deadline:  # a slow dtype gets one burst, not five
            best = max(best, burst())
    finally:
        torch.set_num_threads(threads)
    return best * threads if cpu else best


class ThroughputMeter:
    """Tokens and training seconds since the last `take()`; time inside `paused()` is not counted."""

    def __init__(self, flops_per_token: float, peak_tflops: float, world_size: int):
        self.flops_per_token, self.peak_tflops, self.world_size = flops_per_token, peak_tflops, world_size
        self._tokens, self._seconds, self._since = 0, 0.0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    @contextlib.contextmanager
    def paused(self):
        self._seconds += time.perf_counter() - self._since
        try:
            yield
        finally:
            self._since = time.perf_counter()

    def take(self) -> dict[str, float]:
        """The window's figures, then a new window. A window faster than the peak shows that the peak was
        too low (a CPU measured while busy, a wrong train.peak_tflops): the peak becomes what was reached,
        so MFU is never above 100%."""
        now = time.perf_counter()
        seconds = self._seconds + (now - self._since)
        tps = self._tokens / seconds if seconds > 0 else 0.0
        tflops = tps * self.flops_per_token / 1e12
        self.peak_tflops = max(self.peak_tflops, tflops / self.world_size)
        self._tokens, self._seconds, self._since = 0, 0.0, now
        return {"tokens_per_s": tps, "tokens_per_s_per_rank": tps / self.world_size, "tflops": tflops,
                "mfu": tflops / (self.peak_tflops * self.world_size) if tflops else 0.0}
