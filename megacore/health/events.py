"""Health events: every skip, rerun, rollback, stop, hang, restart and persistent straggler goes to
RUN_DIR/health/events.jsonl (one JSON line each, appended), the console and W&B (`run.alert`, at most
one per kind every `ALERT_EVERY_S`). `megacore health RUN_DIR` reads them back (`history`).

RUN_DIR/health/ also holds what the run's launchers read: STOPPED (a fatal stop: never requeue) and
HANG (the last exit was a hang: restart or requeue), each a JSON line with the step and the reason.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

from data_pipeline.durable import write_json_atomic
from megacore.run_dir import EVENTS, HANG, HEALTH_DIR, STOPPED

# Exit statuses: a fatal health stop (never restarted or requeued) and a hang (restart from the last
# checkpoint). 2 stays the user's errors (megacore/errors.py).
EXIT_FATAL, EXIT_HANG = 3, 4
ALERT_EVERY_S = 300


def health_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / HEALTH_DIR


class HealthEvents:
    """Events of decisions every rank takes alike are recorded by rank 0 only (`record`); a hang is
    recorded by the rank that saw it first, with its rank."""

    def __init__(self, run_dir: str | Path, rank: int, wandb=None, echo=print, record: bool = True):
        self.dir, self.rank, self.wandb, self.echo, self.record = health_dir(run_dir), rank, wandb, echo, record
        self._last_alert: dict[str, float] = {}

    def emit(self, kind: str, message: str, step: int | None = None, **fields) -> dict:
        record = {"time": time.time(), "kind": kind, "step": step, "rank": self.rank, "host": socket.gethostname(),
                  "message": message, **{k: _plain(v) for k, v in fields.items()}}
        if not self.record:
            return record
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / EVENTS, "a") as f:  # one write of one line: whole lines, even from several ranks
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.echo(f"health: {message}")
        self._alert(kind, message)
        return record

    def _alert(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if self.wandb is None or now - self._last_alert.get(kind, -ALERT_EVERY_S) < ALERT_EVERY_S:
            return
        self._last_alert[kind] = now
        self.wandb.alert(f"megacore: {kind}", message)

    def mark(self, name: str, step: int | None, reason: str) -> None:
        """STOPPED or HANG for the launchers (atomic; the newest reason wins)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / name, {"step": step, "reason": reason, "time": time.time()})


def _plain(value):
    """Strict JSON: a non-finite float as its name ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def clear_marks(run_dir: str | Path) -> None:
    """At a start: the last exit's markers describe a run that is now continuing."""
    for name in (STOPPED, HANG):
        (health_dir(run_dir) / name).unlink(missing_ok=True)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file of RUN_DIR/health/ ([] if none); a line cut by a crash mid-write
    is left out, the rest still reads."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_events(run_dir: str | Path) -> list[dict]:
    return read_jsonl(health_dir(run_dir) / EVENTS)


def history(run_dir: str | Path) -> str:
    """`megacore health RUN_DIR`: the run's health history, then a summary by kind."""
    events = read_events(run_dir)
    if not events:
        return f"{run_dir}: no health events (a clean run, or one from before run health existed)"
    lines = [f"{run_dir}: {len(events)} health event(s)"]
    for e in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
        step = f"step {e['step']}" if e.get("step") is not None else "-"
        lines.append(f"  {when}  {e['kind']:<10} {step:<11} {e['message']}")
    counts: dict[str, int] = {}
    for e in events:
        counts[e["kind"]] = counts.get(e["kind"], 0) + 1
    skipped = sorted({s for e in events if e["kind"] == "skip" for s in [e.get("step")] if s is not None})
    hung = sorted({r for e in events if e["kind"] == "hang" for r in e.get("ranks", [])})
    slow = sorted({e.get("slowest_rank") for e in events if e["kind"] == "straggler"} - {None})
    lines.append("summary: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if skipped:
        lines.append(f"  skipped steps: {', '.join(map(str, skipped))}")
    if hung:
        lines.append(f"  ranks named in hangs: {', '.join(map(str, hung))}")
    if slow:
        lines.append(f"  persistent stragglers: rank(s) {', '.join(map(str, slow))}")
    for name in (STOPPED, HANG):
        path = health_dir(run_dir) / name
        if path.is_file():
            mark = json.loads(path.read_text())
            lines.append(f"  last exit: {name.lower()} at step {mark.get('step')}: {mark.get('reason')}")
    return "\n".join(lines)
