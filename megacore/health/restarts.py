"""Restart loops: a job that keeps restarting without making progress is stopped, saying why.

Rank 0 appends a line to RUN_DIR/health/starts.jsonl at every start (the step it continues from, the
torchrun and Slurm restart counts) and marks it ended when the invocation ends cleanly (finished, or
stopped on request). A start that continues from the same step as the `max_restarts_without_progress`
starts before it, none of which ended, is a loop: the run refuses to start, and no launcher restarts it.
The file grows by one line per start.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megacore.health.events import health_dir, read_jsonl
from megacore.run_dir import STARTS


def restart_loop(run_dir: str | Path, step: int, limit: int) -> str | None:
    """Why this start must not run (a loop), or None; then records it."""
    path = health_dir(run_dir) / STARTS
    starts = read_jsonl(path)
    loop = None
    if limit > 0 and len(starts) >= limit:
        last = starts[-limit:]
        if all(s["step"] == step and not s.get("ended") for s in last):
            loop = (f"restart loop: the {limit} starts before this one all continued from step {step} and none "
                    f"ended (a crash or hang each time); not starting again. Look at `megacore health "
                    f"{run_dir}` and the launch logs, fix the cause, then start with health."
                    f"max_restarts_without_progress raised or {path} removed")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.time(), "step": step, "loop": loop is not None,
                            "torchrun_restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
                            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}) + "\n")
    return loop


def mark_ended(run_dir: str | Path) -> None:
    """The newest start ended cleanly (rewrites its line; the file is small)."""
    path = health_dir(run_dir) / STARTS
    starts = read_jsonl(path)
    if not starts:
        return
    starts[-1]["ended"] = time.time()
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(s) + "\n" for s in starts))
    os.replace(tmp, path)
