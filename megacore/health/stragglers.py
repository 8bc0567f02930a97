"""Stragglers: which rank sets the pace, measured so that waiting for the others does not count.

A rank's own time over a logging window is what its threads spent running plus what they spent ready
to run but waiting for a core (Linux's per-thread schedstat: on-CPU time and run-queue delay). Time
blocked in a collective, waiting for a slower rank, is in neither. A rank on a slower or busier core
(fewer CPU cycles than its peers) shows it in one of the two; its peers' own times stay short. At each
logging step the per-rank figures are gathered (one all-gather of a float per rank, on the CPU) and
rank 0 reports the slowest against the median. (On GPUs the device's own kernels are not in this
measure; what the host does for them is.)
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist


def own_seconds() -> float:
    """This process's on-CPU time plus run-queue delay, summed over its threads (Linux)."""
    total = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                running, waiting = f.read().split()[:2]
            total += int(running) + int(waiting)
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue
    return total / 1e9


@dataclass(frozen=True)
class StragglerReport:
    step: int
    per_rank: list[float]  # own seconds per step
    slowest_rank: int
    slowest_ratio: float  # slowest / median
    flagged: bool  # above health.straggler_ratio
    persistent: bool  # the same rank flagged straggler_windows windows in a row

    def record(self) -> dict:
        return {"slowest_rank": self.slowest_rank, "slowest_ratio": round(self.slowest_ratio, 4),
                "per_rank_s_per_step": [round(s, 5) for s in self.per_rank]}


class Stragglers:
    def __init__(self, ratio: float, windows: int, rank: int, world_size: int):
        self.ratio, self.windows, self.rank, self.world_size = ratio, windows, rank, world_size
        self._since, self._steps = own_seconds(), 0
        self._streak: tuple[int, int] = (-1, 0)  # (rank, windows flagged in a row)

    def add_step(self) -> None:
        self._steps += 1

    def pause(self):
        """Evaluation and saves are not steps: their time leaves the window (call resume after)."""
        self._paused_at = own_seconds()

    def resume(self) -> None:
        self._since += own_seconds() - self._paused_at

    def report(self, step: int) -> StragglerReport | None:
        """Every rank calls this at a logging step (a collective); rank 0 gets the report."""
        now = own_seconds()
        mine = (now - self._since) / max(1, self._steps)
        self._since, self._steps = now, 0
        if self.world_size == 1:
            return None
        gathered = torch.zeros(self.world_size, dtype=torch.float64)  # (each rank fills its slot: a sum)
        gathered[self.rank] = mine
        dist.all_reduce(gathered)
        if self.rank != 0:
            return None
        per_rank = gathered.tolist()
        median = statistics.median_low(per_rank)  # (the lower middle: with 2 ranks, the faster one)
        slowest = max(range(len(per_rank)), key=per_rank.__getitem__)
        ratio = per_rank[slowest] / median if median > 0 else 1.0
        flagged = ratio > self.ratio
        streak = self._streak[1] + 1 if flagged and self._streak[0] == slowest else int(flagged)
        self._streak = (slowest, streak)
        return StragglerReport(step, per_rank, slowest, ratio, flagged, flagged and streak == self.windows)
