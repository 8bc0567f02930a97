"""Weights & Biases from rank 0: one run per run directory, from the first step to the last.

The run id is made once and kept in RUN_DIR/wandb_run.json (and in every checkpoint's meta.json); every
start of the run (resume, requeue, torchrun restart) continues it with `resume="allow"`. Steps already
logged before a crash are not logged again, so the run's history stays strictly increasing.

Nothing here may stall or kill training: compute nodes often have no internet. `auto` picks offline
mode when there is no API key or the server does not answer a 2-second connect, and prints the
`wandb sync` command; init has a time-out; every call is guarded, and the first error turns W&B off
for the rest of the run with one warning. Only rank 0 talks to W&B; no collective waits on it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from data_pipeline.durable import write_json_atomic
from megacore.run_dir import WANDB_STATE

INIT_TIMEOUT_S = 30


def _warn(message: str) -> None:
    print(f"warning: W&B: {message}", file=sys.stderr, flush=True)


def _has_api_key(base_url: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and (urlparse(base_url).hostname or "") in netrc.read_text(errors="replace")


def _reachable(base_url: str, timeout: float = 2.0) -> bool:
    url = urlparse(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def choose_mode(requested: str) -> str:
    """online or offline (or disabled), deciding `auto` without ever waiting on a dead network."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("offline", "online", "disabled"):
        return os.environ["WANDB_MODE"]
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not _has_api_key(base_url):
        return "offline"
    return "online" if _reachable(base_url) else "offline"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def read_state(run_dir: str | Path) -> dict:
    path = Path(run_dir) / WANDB_STATE
    return json.loads(path.read_text()) if path.is_file() else {}


class WandbRun:
    """wandb.init / log / finish for rank 0, or nothing at all (disabled, or after an error)."""

    def __init__(self, cfg, run_dir: str | Path, run_id: str | None = None):
        self.run_dir, self.run = Path(run_dir), None
        self.state = read_state(run_dir)
        mode = choose_mode(cfg.logging.wandb_mode)
        if mode == "disabled":
            return
        try:
            import wandb

            restarts = {"torchrun": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
                        "slurm": int(os.environ.get("SLURM_RESTART_COUNT", 0))}
            job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
            run_id = run_id or self.state.get("id") or secrets.token_hex(4)
            self.run = wandb.init(
                project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity or None,
                name=cfg.logging.wandb_name or self.run_dir.resolve().name, id=run_id, resume="allow", mode=mode,
                dir=str(self.run_dir), group=f"slurm-{job_id}" if job_id else None, job_type="train",
                tags=[*cfg.logging.wandb_tags, *([f"slurm-{job_id}"] if job_id else []),
                      f"start-{restarts['slurm'] + restarts['torchrun']}"],
                config={**cfg.to_dict(), "git_commit": git_commit()},
                settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, console="off", silent=True))
            self.state["id"] = self.run.id
            self._save_state()
            self.run.log({"restarts/torchrun": restarts["torchrun"], "restarts/slurm": restarts["slurm"]},
                         step=self.state.get("last_step", 0) + 1, commit=False)
            if mode == "offline":
                print(f"W&B offline run {self.run.id}; upload with: wandb sync {self.run.dir.rsplit('/files', 1)[0]}",
                      flush=True)
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            _warn(f"disabled ({type(e).__name__}: {e})")
            self.run = None

    @property
    def id(self) -> str | None:
        return self.state.get("id") if self.run is not None else None

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        """Log `metrics` as KIND/NAME at `step`. Training steps logged before a crash (the run resumed
        from an older checkpoint) are skipped: W&B history must only move forward."""
        if self.run is None or (kind == "train" and step <= self.state.get("last_step", 0)):
            return
        try:
            self.run.log({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
            if kind == "train":
                self.state["last_step"] = step
                self._save_state()
        except Exception as e:  # noqa: BLE001
            _warn(f"turned off after an error ({type(e).__name__}: {e})")
            self.run = None

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (email or Slack, as the user's W&B settings say); the caller rate-limits."""
        if self.run is None:
            return
        try:
            import wandb

            self.run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)
        except Exception as e:  # noqa: BLE001
            _warn(f"alert failed ({type(e).__name__}: {e})")

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001
                _warn(f"finish failed ({type(e).__name__}: {e})")
            self.run = None

    def _save_state(self) -> None:
        write_json_atomic(self.run_dir / WANDB_STATE, self.state, indent=None)
