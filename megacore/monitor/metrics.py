"""Metrics out of the training loop: one JSON line per logged step or event (RUN_DIR/metrics.jsonl), a
console line with ETA, and the same records to W&B when it is on (megacore/monitor/wandb_run.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Rank 0 writes RUN_DIR/metrics.jsonl (appending across resumes) and prints progress. Kinds: train,
    val, checkpoint (an event: step, seconds, path)."""

    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, log_every: int, wandb=None):
        self.enabled, self.total_steps, self.log_every, self.wandb = enabled, total_steps, log_every, wandb
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a") if enabled else None
        self._start_time, self._start_step = time.time(), None

    def should_log(self, step: int, end_step: int) -> bool:
        """Training metrics every logging.log_every steps and at the last step (on every rank: the figures
        come from collectives that every rank joins)."""
        return step % self.log_every == 0 or step == end_step

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if kind == "train" or kind.startswith("val"):
            print(self._console_line(step, metrics, kind), flush=True)
        if self.wandb is not None:
            self.wandb.log(step, metrics, kind)

    def _console_line(self, step: int, metrics: dict, kind: str) -> str:
        parts = [f"step {step:>5}/{self.total_steps}", kind]
        for key, value in metrics.items():
            if isinstance(value, float):
                value = f"{value:.3e}" if key == "lr" else f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
            parts.append(f"{key} {value}")
        if kind == "train":
            if self._start_step is None:
                self._start_step, self._start_time = step, time.time()
            elif step > self._start_step:
                rate = (time.time() - self._start_time) / (step - self._start_step)
                parts.append(f"eta {format_duration(rate * (self.total_steps - step))}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
