"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout: RUN_DIR/checkpoints/step_00000100/ holds DCP's files (model and optimizer, each rank writing
its own shards) and meta.json (step, data-loader state, resolved config). A checkpoint is written as
`step_XXXXXXXX.tmp` and renamed only once every rank has finished and meta.json is on disk, so a
directory with a final name is complete; `--resume auto` takes the newest of those.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from megacore.config import CheckpointConfig

META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(path: str | Path) -> dict:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no {META}): {path}")
    return json.loads(meta_path.read_text())


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (meaning its newest checkpoint)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    return latest


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, is_main: bool):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg, self.is_main = cfg, is_main

    def save(self, step: int, model: nn.Module, optimizer, meta: dict) -> Path:
        final = self.root / step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            # A leftover from a save that crashed is never loaded; clear it before writing again.
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(tmp))
        dist.barrier()
        if self.is_main:
            _write_json_durable(tmp / META, {"step": step, **meta})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        dist.barrier()
        return final

    def load(self, path: str | Path, model: nn.Module, optimizer=None) -> dict:
        """Load weights (and optimizer state, when given) into the already-parallelized model."""
        path = Path(path)
        meta = read_meta(path)
        state = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optim"])
        return meta

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        for old in list_checkpoints(self.root.parent)[:-self.cfg.keep_last]:
            shutil.rmtree(old)


def _write_json_durable(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
