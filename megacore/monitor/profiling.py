"""Profiling a few training steps with torch.profiler: where the time goes, and how much is communication.

With logging.profile_start=N the steps N .. N+profile_steps-1 run under the profiler on every rank.
Each rank writes a Chrome/Perfetto trace (RUN_DIR/profile/rank{R}.trace.json); rank 0 writes
RUN_DIR/profile/summary.json and prints the communication share and the host syncs per step
(megacore/monitor/host_syncs.py). The communication share is the part of the profiled wall time
during which a collective was in flight on that rank (the union of the
gloo/NCCL collective intervals, so overlapping ones count once), whether or not compute overlapped it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from data_pipeline.durable import write_json_atomic
from megacore.monitor.host_syncs import count_in_profile
from megacore.run_dir import PROFILE
from megacore.train.hooks import Hook


def _is_collective(name: str) -> bool:
    # gloo runs each collective as a "gloo:<op>" event on its worker thread; NCCL as nccl* kernels.
    return name.startswith("gloo:") or "nccl" in name.lower()


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize(prof: profile, wall_s: float, steps: int = 1, device_type: str = "cpu", top: int = 15) -> dict:
    """This rank's profile: collective time (union), its share of the wall time, host syncs per step
    (megacore/monitor/host_syncs.py; the train step makes none, a logging step reads its metrics), and
    the top ops by self time."""
    intervals, self_time = [], {}
    events = prof.events()
    for e in events:
        if _is_collective(e.name):
            intervals.append((e.time_range.start / 1e6, e.time_range.end / 1e6))
        self_time[e.name] = self_time.get(e.name, 0.0) + (e.self_cpu_time_total + e.self_device_time_total) / 1e6
    comm = union_seconds(intervals)
    ops = sorted(self_time.items(), key=lambda kv: -kv[1])[:top]
    syncs = count_in_profile(events, device_type)
    return {"wall_s": round(wall_s, 4), "communication_s": round(comm, 4),
            "communication_share": round(comm / wall_s, 4) if wall_s > 0 else 0.0,
            "host_syncs": syncs, "host_syncs_per_step": round(syncs / steps, 2),
            "top_self_time_s": {name: round(s, 4) for name, s in ops}}


class StepProfiler(Hook):
    """Starts the profiler before step `start` and stops it after step start + steps - 1 (all ranks)."""

    def __init__(self, run_dir: str | Path, start: int, steps: int, rank: int, device: torch.device):
        self.dir, self.rank, self.device = Path(run_dir) / PROFILE, rank, device
        self.start, self.last = start, start + steps - 1
        self._prof: profile | None = None
        self._t0 = 0.0

    def before_step(self, trainer, step: int) -> None:
        if self.start <= 0 or step != self.start:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def after_step(self, trainer, step: int, result) -> None:
        """After the last profiled step: write the traces and the summary, and print the busiest rank's share."""
        summary = self.finish(step)
        if summary is not None:
            share = max(r["communication_share"] for r in summary["ranks"])
            syncs = max(r["host_syncs_per_step"] for r in summary["ranks"])
            print(f"profiled steps {summary['ranks'][0]['steps']}: communication {share:.1%} of the time (busiest "
                  f"rank), {syncs:g} host syncs per step; traces and summary in {self.dir}", flush=True)

    def finish(self, step: int) -> dict | None:
        """Stop after the last profiled step, write this rank's trace; every rank's summary on rank 0."""
        if self._prof is None or step != self.last:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(self.dir / f"rank{self.rank}.trace.json"))
        mine = {"rank": self.rank, "steps": [self.start, self.last],
                **summarize(self._prof, wall, self.last - self.start + 1, self.device.type)}
        self._prof = None
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if self.rank != 0:
            return None
        write_json_atomic(self.dir / "summary.json", {"ranks": everyone})
        return {"ranks": everyone}

    def close(self) -> None:
        """A run that stops inside the profiled steps leaves the profiler running: stop it."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
