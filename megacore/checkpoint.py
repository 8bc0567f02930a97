"""Sharded checkpoints with torch.distributed.checkpoint (DCP): atomic, verifiable, any layout.

Layout of RUN_DIR/checkpoints/:
    step_00000200/          DCP's files (model and optimizer, each rank writing its own shards),
                            meta.json (step, data-loader state, resolved config, layout),
                            rng/rank_00000.json ... (every RNG stream of every rank),
                            manifest.json (size and sha256 of every other file; written last)
    latest                  the name of the newest complete checkpoint

Commit protocol: everything is written under `step_XXXXXXXX.tmp`; once all ranks are done, rank 0
hashes the files, fsyncs manifest.json, renames the directory and then moves `latest`. With
checkpoint.async_save the state is staged in memory and written by a background thread while training
goes on; the commit follows when every rank's write has finished. A directory
with a final name and a manifest is complete; a crash at any point leaves the previous checkpoint
as the newest. Loading verifies the manifest, and `--resume auto` falls back to the newest good
checkpoint, saying which one was skipped and why. Nothing is unpickled: DCP tensors and JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from data_pipeline.shards import TOKENIZER, file_sha256
from megacore.config import CheckpointConfig, CheckpointError, save_config
from megacore.model import Llama
from megacore.run_dir import CONFIG, load_run_config

META, MANIFEST, LATEST = "meta.json", "manifest.json", "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Flattened optimizer state is keyed by parameter name, like the model's: stages merge without clashes
# and a checkpoint loads into any layout.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed checkpoints of a run (final name and a manifest), oldest first; not yet verified."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (an incomplete checkpoint)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable ({e})") from None
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, manifest says {info['bytes']} (truncated?)")
        if file_sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: sha256 mismatch (altered)")


def newest_good_checkpoint(run_dir: str | Path, log=print) -> Path | None:
    """The newest checkpoint that verifies; each skipped one is reported with its reason."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            log(f"warning: skipping checkpoint {path.name}: {e}")
    return None


def read_meta(path: str | Path) -> dict:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no {META}): {path}")
    return json.loads(meta_path.read_text())


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (meaning its newest good checkpoint)."""
    path = Path(path)
    if (path / META).is_file():
        verify_checkpoint(path)
        return path
    found = newest_good_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    return found


class Checkpointer:
    backend = "torch"

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, rank: int):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg, self.rank = cfg, rank
        self._pending = None  # an async save whose files are still being written
        # Async saves run their collectives in a background thread: give them their own group.
        self._async_group = dist.new_group(backend="gloo") if cfg.async_save else None
        # One stager for the whole run: it keeps its staging buffers, so after the first save the
        # in-memory copy that blocks training reuses memory instead of allocating (page-faulting) it.
        self._stager = (DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                     use_shared_memory=False, use_async_staging=False,
                                                     use_non_blocking_copy=False))
                        if cfg.async_save else None)

    def save(self, step: int, parts: list[nn.Module], optimizers, meta: dict) -> Path | None:
        """Write a checkpoint of this step. Synchronous: returns its committed path. Async: returns None
        as soon as the state is staged in memory; `poll` commits it once every rank has written."""
        self.poll(block=True)  # one async save in flight at most
        final = self.root / step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            # A leftover from a save that crashed is never loaded; clear it before writing again.
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        # Captured now: the streams and loader position of this step, whenever the commit happens.
        pending = (step, tmp, final, {"step": step, "time": time.time(), **meta}, rng_state())
        if self.cfg.async_save:
            state = _state(parts, optimizers)[0]
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group,
                                    async_stager=self._stager)
            self._pending = (*pending, future)
            return None
        self._write_state(tmp, parts, optimizers)
        return self._commit(*pending)

    def _write_state(self, tmp: Path, parts: list[nn.Module], optimizers) -> None:
        """Model and optimizer state of every rank into `tmp` (DCP: each rank writes its shards)."""
        dcp.save(_state(parts, optimizers)[0], checkpoint_id=str(tmp))

    def _read_state(self, path: Path, meta: dict, parts: list[nn.Module], optimizers) -> None:
        """Load model (and optimizer) state into the parallelized parts; DCP reshards to this layout."""
        state, keys = _state(parts, optimizers)
        dcp.load(state, checkpoint_id=str(path))
        for i, part in enumerate(parts):
            model_keys, optim_keys = keys[i]
            set_model_state_dict(part, {k: state["model"][k] for k in model_keys}, options=_OPTIONS)
            if optimizers is not None:
                set_optimizer_state_dict(part, optimizers.optimizers[i], {k: state["optim"][k] for k in optim_keys},
                                         options=_OPTIONS)

    def poll(self, block: bool = False) -> Path | None:
        """Commit the async save in flight once every rank's files are written (all ranks call this)."""
        if self._pending is None:
            return None
        *pending, future = self._pending
        done = torch.tensor([1 if block or future.done() else 0])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if not done.item():
            return None
        future.result()
        self._pending = None
        return self._commit(*pending)

    def close(self) -> None:
        """After the last save: wait for it, and free the async stager's buffers."""
        last = self.poll(block=True)
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        return last

    def _commit(self, step: int, tmp: Path, final: Path, meta: dict, rng: dict) -> Path:
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        _write_json_durable(tmp / "rng" / f"rank_{self.rank:05d}.json", rng)
        dist.barrier()
        if self.rank == 0:
            commit_directory(tmp, final, meta)
            self._prune()
        dist.barrier()
        return final

    def load(self, path: str | Path, parts: list[nn.Module], optimizers=None) -> dict:
        """Load weights (and optimizer state and this rank's RNG streams, when given) into the
        already-parallelized model parts. Any layout loads any other layout's checkpoint."""
        path = Path(path)
        meta = read_meta(path)
        if backend_of(meta) != self.backend:
            raise CheckpointError(f"{path}: written by parallel.backend={backend_of(meta)}, this run uses "
                                  f"{self.backend}; start a new run with train.init_from={path} (weights only)")
        if optimizers is not None and meta.get("weights_only"):
            raise CheckpointError(f"{path}: holds weights only (no optimizer state); start a new run with "
                                  f"train.init_from={path}")
        self._read_state(path, meta, parts, optimizers)
        rng_file = path / "rng" / f"rank_{self.rank:05d}.json"
        if optimizers is not None and meta.get("world_size") == dist.get_world_size() and rng_file.is_file():
            # Same world size: every rank continues its own random streams. Otherwise they restart
            # from the seed (only model.dropout draws from them in training).
            set_rng_state(json.loads(rng_file.read_text()))
        return meta

    def _prune(self) -> None:
        """Keep the newest keep_last checkpoints, and every keep_every-th step for good."""
        if self.cfg.keep_last <= 0:
            return
        for old in list_checkpoints(self.root.parent)[:-self.cfg.keep_last]:
            if not (self.cfg.keep_every and step_of(old) % self.cfg.keep_every == 0):
                shutil.rmtree(old)


def commit_directory(tmp: Path, final: Path, meta: dict) -> None:
    """Once every file of `tmp` is written: meta.json, then the manifest (fsynced), the rename, `latest`."""
    _write_json_durable(tmp / META, meta)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    _write_json_durable(tmp / MANIFEST, {"files": {
        str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _write_latest(final.parent, final.name)


def backend_of(meta: dict) -> str:
    return meta.get("config", {}).get("parallel", {}).get("backend", "torch")


def load_model_weights(model: nn.Module, path: str | Path) -> Path:
    """Whole-model fp32 weights from a run or checkpoint directory (either backend, any layout) into an
    unparallelized model, on one process; returns the checkpoint used."""
    ckpt = resolve_checkpoint(path)
    if backend_of(read_meta(ckpt)) == "deepspeed":
        from megacore.parallel.deepspeed import consolidated_state_dict

        model.load_state_dict(consolidated_state_dict(ckpt))
        return ckpt
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        # A deliberate single-process load; DCP warns about that even when told so.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=not dist.is_initialized())
    model.load_state_dict(state["model"])
    return ckpt


def rng_state() -> dict:
    """Every random stream of this process, as JSON (no pickle)."""
    np_state = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


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


def _write_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


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


def consolidate(source: str | Path, out: str | Path) -> Path:
    """Write a checkpoint of either backend as a weights-only, single-file-set DCP checkpoint in a new run
    directory OUT (config with backend=torch, tokenizer): eval, generate, export-hf and train.init_from
    read it like any torch-backend run. Returns the new checkpoint directory."""
    ckpt = resolve_checkpoint(source)
    run_dir, out = ckpt.parent.parent, Path(out)
    if list_checkpoints(out):
        raise FileExistsError(f"{out} already has checkpoints; choose a new directory")
    cfg = load_run_config(run_dir)
    model = Llama(cfg.model)
    load_model_weights(model, ckpt)
    cfg.parallel = type(cfg.parallel)()  # a plain torch-backend layout; any layout can load it
    meta = {**read_meta(ckpt), "weights_only": True, "consolidated_from": str(ckpt.resolve()),
            "config": cfg.to_dict()}
    final = out / "checkpoints" / ckpt.name
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_config(cfg, out / CONFIG)
    shutil.copyfile(run_dir / TOKENIZER, out / TOKENIZER)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp), no_dist=True)
    commit_directory(tmp, final, meta)
    return final
