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
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

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

    def save(self, step: int, parts: list[nn.Module], optimizers, meta: dict) -> Path:
        final = self.root / step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            # A leftover from a save that crashed is never loaded; clear it before writing again.
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        dcp.save(_state(parts, optimizers)[0], checkpoint_id=str(tmp))
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

    def load(self, path: str | Path, parts: list[nn.Module], optimizers=None) -> dict:
        """Load weights (and optimizer state, when given) into the already-parallelized model parts.

        Keys are parameter names of the whole model, so any layout loads any other layout's checkpoint.
        """
        path = Path(path)
        meta = read_meta(path)
        state, keys = _state(parts, optimizers)
        dcp.load(state, checkpoint_id=str(path))
        for i, part in enumerate(parts):
            model_keys, optim_keys = keys[i]
            set_model_state_dict(part, {k: state["model"][k] for k in model_keys}, options=_OPTIONS)
            if optimizers is not None:
                set_optimizer_state_dict(part, optimizers.optimizers[i], {k: state["optim"][k] for k in optim_keys},
                                         options=_OPTIONS)
        return meta

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        for old in list_checkpoints(self.root.parent)[:-self.cfg.keep_last]:
            shutil.rmtree(old)


# Flattened optimizer state is keyed by parameter name, like the model's: stages merge without clashes.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _state(parts: list[nn.Module], optimizers) -> tuple[dict, list[tuple[list[str], list[str]]]]:
    """({"model": {...}, "optim": {...}} merged over this rank's model parts, each part's (model, optim) keys)."""
    model, optim, keys = {}, {}, []
    for i, part in enumerate(parts):
        sd = get_model_state_dict(part, options=_OPTIONS)
        osd = get_optimizer_state_dict(part, optimizers.optimizers[i], options=_OPTIONS) if optimizers else {}
        model.update(sd)
        optim.update(osd)
        keys.append((list(sd), list(osd)))
    return ({"model": model, "optim": optim} if optimizers is not None else {"model": model}), keys


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
