"""Stopping cleanly for preemption or a time limit: checkpoint at the next step boundary, then exit.

A stop is asked for by SIGUSR1 to any rank, or by the file RUN_DIR/STOP (the Slurm batch script writes
it when Slurm warns it before the time limit: the signal reaches the batch shell, not the ranks under
torchrun). Every rank must stop at the same step, so the request is agreed with one all-reduce per step.
After the checkpoint, rank 0 leaves RUN_DIR/PREEMPTED; the batch script turns that into
`scontrol requeue` (torchrun does not pass the ranks' exit codes on, so a file carries the outcome).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
import torch.distributed as dist

STOP, PREEMPTED = "STOP", "PREEMPTED"


class StopRequest:
    def __init__(self, run_dir: str | Path, is_main: bool):
        self.run_dir, self.is_main = Path(run_dir), is_main
        self._signalled = False
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def agreed(self) -> bool:
        """True on every rank once any rank was signalled or rank 0 sees the STOP file."""
        mine = self._signalled or (self.is_main and (self.run_dir / STOP).exists())
        flag = torch.tensor([1 if mine else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def mark_stopped(self, step: int) -> None:
        if self.is_main:
            (self.run_dir / STOP).unlink(missing_ok=True)
            (self.run_dir / PREEMPTED).write_text(json.dumps({"step": step}) + "\n")
