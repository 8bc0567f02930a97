"""Stopping cleanly for preemption or a time limit: checkpoint at the next step boundary, then exit.

A stop is asked for by SIGUSR1 to any rank, or by the file RUN_DIR/STOP (the Slurm batch script writes
it when Slurm warns it before the time limit: the signal reaches the batch shell, not the ranks under
torchrun). Every rank must stop at the same step: the votes travel in the step's loss all-reduce.
After the checkpoint, rank 0 leaves RUN_DIR/PREEMPTED; the batch script turns that into
`scontrol requeue` (torchrun does not pass the ranks' exit codes on, so a file carries the outcome).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from megacore.run_dir import PREEMPTED, STOP


class StopRequest:
    def __init__(self, run_dir: str | Path, is_main: bool):
        self.run_dir, self.is_main = Path(run_dir), is_main
        self._signalled = False
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def requested_here(self) -> bool:
        """This rank's vote: it was signalled, or (rank 0) the STOP file exists. The trainer sums the
        votes in the step's loss all-reduce, so every rank stops at the same step."""
        return self._signalled or (self.is_main and (self.run_dir / STOP).exists())

    def mark_stopped(self, step: int) -> None:
        if self.is_main:
            (self.run_dir / STOP).unlink(missing_ok=True)
            (self.run_dir / PREEMPTED).write_text(json.dumps({"step": step}) + "\n")
