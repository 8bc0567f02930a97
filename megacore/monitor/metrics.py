"""Metrics out of the training loop: one JSON line per logged step or event (RUN_DIR/metrics.jsonl), a
console line with ETA, and the same records to W&B when it is on (megacore/monitor/wandb_run.py).

Each step appears once in metrics.jsonl: a run that continues from step S (a resume, a requeue, a
torchrun restart) first moves the records of steps after S, which it is about to log again, to
RUN_DIR/metrics.superseded.jsonl. Only the tail since S is read to find them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megacore.run_dir import METRICS, SUPERSEDED


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Rank 0 writes RUN_DIR/metrics.jsonl (appending across resumes) and prints progress. Kinds: train,
    val, checkpoint (an event: step, seconds, path)."""

    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, log_every: int, wandb=None,
                 continues_from: int = 0):
        self.enabled, self.total_steps, self.log_every, self.wandb = enabled, total_steps, log_every, wandb
        self.path = Path(run_dir) / METRICS
        if enabled:
            drop_records_after(self.path, continues_from, Path(run_dir) / SUPERSEDED)
        self._file = open(self.path, "a") if enabled else None
        self._start_time, self._start_step = time.time(), None

    def rewind(self, step: int) -> None:
        """A rollback to `step` within this invocation: the records after it go to the superseded file, as
        at a resume, so that each step stays logged once."""
        if not self.enabled:
            return
        self._file.close()
        drop_records_after(self.path, step, self.path.parent / SUPERSEDED)
        self._file = open(self.path, "a")

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
        """A short line (every field is in metrics.jsonl): train steps with their ETA first; eval sets."""
        head = f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"
        if kind != "train":
            return (f"{head} | {kind} loss {metrics['loss']:.4f} | ppl {metrics['perplexity']:,.4g} | "
                    f"bpb {metrics['bits_per_byte']:.3f} | acc {metrics['accuracy']:.3f}")
        parts = [head]
        if self._start_step is None:
            self._start_step, self._start_time = step, time.time()
        elif step > self._start_step:
            rate = (time.time() - self._start_time) / (step - self._start_step)
            parts.append(f"eta {format_duration(rate * (self.total_steps - step))}")
        parts += [f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}", f"grad {metrics['grad_norm']:.3g}",
                  f"{metrics['tokens_per_s']:,.0f} tok/s", f"mfu {metrics['mfu']:.1%}"]
        if metrics.get("skipped_batches"):
            parts.append(f"skipped {metrics['skipped_batches']}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self.wandb is not None:
            self.wandb.finish()


def drop_records_after(path: Path, step: int, superseded: Path) -> int:
    """Move the records of steps after `step` (and a half-written last line) from the end of `path` to
    the end of `superseded`; returns the bytes moved. Reads backwards from the end, in 1 MiB blocks,
    until it meets a record of a step <= `step`: the cost grows with the steps since the checkpoint."""
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        cut = _first_byte_after(f, step)
        f.seek(cut)
        tail = f.read()
        if not tail:
            return 0
        with open(superseded, "ab") as out:
            out.write(tail if tail.endswith(b"\n") else tail + b"\n")
            out.flush()
            os.fsync(out.fileno())
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    return len(tail)


def _first_byte_after(f, step: int) -> int:
    """Offset just past the last complete record of a step <= `step` (0 if there is none)."""
    end = f.seek(0, os.SEEK_END)
    pos, carry = end, b""
    while pos > 0:
        size = min(1 << 20, pos)
        pos -= size
        f.seek(pos)
        block = f.read(size) + carry
        lines = block.split(b"\n")
        # The first piece may be the end of a line that starts in an earlier block (unless pos is 0).
        carry, whole = (b"", lines) if pos == 0 else (lines[0], lines[1:])
        line_end = pos + len(block)
        for line in reversed(whole):
            start, line_end = line_end - len(line), line_end - len(line) - 1
            try:
                record = json.loads(line)
            except ValueError:
                continue  # blank, or half-written by a killed rank 0
            if record.get("step", 0) <= step:
                return min(end, start + len(line) + 1)
    return 0
