"""The torch backend's checkpointer: torch.distributed.checkpoint (DCP), atomic, verifiable, any layout.

Each rank writes its own shards of the model and optimizer state; DCP reshards on load, so a checkpoint
written by one layout and world size resumes on any other. With checkpoint.async_save the state is
staged in memory and written by a background thread while training goes on; the commit
(megacore/checkpoint/store.py) follows once every rank's write has finished. Every RNG stream of every
rank is kept as JSON. Every load reads DCP's pickled metadata through an allow-list
(megacore/checkpoint/safe_load.py): a checkpoint cannot execute code.

With checkpoint.dir in object storage, the files are written and sealed (manifest) as locally, under
RUN_DIR/checkpoints/step_N.tmp, then uploaded: each rank uploads the files it wrote (its shards and RNG
streams, in parallel across ranks; local disk holds one checkpoint's shards of this node's ranks at a
time), rank 0 the rest, and once every rank is done rank 0 uploads the manifest, which commits. An async
save uploads in a background thread as well: training stalls only for the in-memory staging, as locally.
Loads read the byte ranges each rank needs straight from the store.

The checkpointer decides its own timing (`should_save`) and keeps its own state (the save in flight).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from data_pipeline.durable import write_json_atomic
from data_pipeline.storage import Location, exists, location, upload
from megacore.checkpoint.digests import hashing_writer, owner_of, rank_digests, streamed_digests
from megacore.checkpoint.meta import CheckpointMeta, read_meta
from megacore.checkpoint.safe_load import load_dcp
from megacore.checkpoint.store import (
    MANIFEST,
    checkpoints_root,
    commit_directory,
    delete_checkpoint,
    prune,
    seal_directory,
    step_dir_name,
)
from megacore.config import CheckpointConfig
from megacore.errors import CheckpointError
from megacore.run_dir import CHECKPOINTS, CONFIG, RUN_FILES, load_run_config, tokenizer_files

# Flattened optimizer state is keyed by parameter name, like the model's: stages merge without clashes
# and a checkpoint loads into any layout.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, rank: int):
        self.run_dir, self.root = Path(run_dir), checkpoints_root(run_dir, cfg.dir)
        self.remote = not isinstance(self.root, Path)
        # Where a checkpoint is written before it commits: beside its final name locally (a rename
        # commits), in the run directory when it is uploaded.
        self.staging = self.run_dir / CHECKPOINTS if self.remote else self.root
        self.cfg, self.rank = cfg, rank
        self._pending = None  # an async save whose files are still being written
        self._uploading = None  # (tmp, final, future): a save whose files are being uploaded
        self._run_files: list[str] | None = None  # what each checkpoint carries in run/ (rank 0)
        self._uploader = (ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
                          if self.remote and cfg.async_save else None)
        self.last_commit_seconds = 0.0  # from all files written to committed, of the last save
        # Async saves run their collectives in a background thread: give them their own group.
        self._async_group = dist.new_group(backend="gloo") if cfg.async_save else None
        # One stager for the whole run: it keeps its staging buffers, so after the first save the
        # in-memory copy that blocks training reuses memory instead of allocating (page-faulting) it.
        self._stager = (DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                     use_shared_memory=False, use_async_staging=False,
                                                     use_non_blocking_copy=False))
                        if cfg.async_save else None)

    def should_save(self, step: int, end_step: int, stopping: bool = False) -> bool:
        """Every checkpoint.every steps, at the end of this invocation, and when the run stops early
        (never with checkpoint.enabled=false)."""
        return self.cfg.enabled and (step % self.cfg.every == 0 or step == end_step or stopping)

    def save(self, step: int, parts: list[nn.Module], optimizers, meta: CheckpointMeta) -> Path | None:
        """Write a checkpoint of this step. Synchronous: returns its committed path. Async: returns None
        as soon as the state is staged in memory; `poll` commits it once every rank has written."""
        self.poll(block=True)  # one async save in flight at most
        final = self.root / step_dir_name(step)
        tmp = self.staging / (final.name + ".tmp")
        if self.rank == 0:
            self.staging.mkdir(parents=True, exist_ok=True)
        # A leftover from a save that crashed is never loaded; clear it before writing again (every rank:
        # a run directory not shared between nodes has a copy on each).
        shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        # Captured now: the streams and loader position of this step, whenever the commit happens.
        pending = (tmp, final, dataclasses.replace(meta, step=step, time=time.time()), rng_state())
        writer = hashing_writer(tmp)  # each file's sha256 is taken as it is written
        if self.cfg.async_save:
            state = _state(parts, optimizers)[0]
            future = dcp.async_save(state, storage_writer=writer, process_group=self._async_group,
                                    async_stager=self._stager)
            self._pending = (*pending, writer, future)
            return None
        self._write_state(tmp, parts, optimizers, writer)
        return self._commit(*pending, writer)

    def _write_state(self, tmp: Path, parts: list[nn.Module], optimizers, writer) -> None:
        """Model and optimizer state of every rank into `tmp` (DCP: each rank writes its shards)."""
        dcp.save(_state(parts, optimizers)[0], storage_writer=writer)

    def _read_state(self, path: Path, meta: CheckpointMeta, parts: list[nn.Module], optimizers) -> None:
        """Load model (and optimizer) state into the parallelized parts; DCP reshards to this layout."""
        state, keys = _state(parts, optimizers)
        load_dcp(state, path)
        for i, part in enumerate(parts):
            model_keys, optim_keys = keys[i]
            set_model_state_dict(part, {k: state["model"][k] for k in model_keys}, options=_OPTIONS)
            if optimizers is not None:
                set_optimizer_state_dict(part, optimizers.optimizers[i], {k: state["optim"][k] for k in optim_keys},
                                         options=_OPTIONS)

    def poll(self, block: bool = False) -> Location | None:
        """Commit the async save in flight once every rank's files are written (and, for object storage,
        uploaded); all ranks call this. Returns the committed checkpoint, or None."""
        if self._pending is not None:
            *pending, writer, future = self._pending
            if not _all_done(future, block):
                return None
            self._pending = None
            _together(future.result)
            committed = self._commit(*pending, writer)
            if committed is not None or not block:
                return committed
        if self._uploading is not None:
            tmp, final, future = self._uploading
            if not _all_done(future, block):
                return None
            self._uploading = None
            _together(future.result)
            return self._finish_upload(tmp, final)
        return None

    def close(self) -> Path | None:
        """After the last save: wait for it, and free the async stager's buffers."""
        last = self.poll(block=True)
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._uploader is not None:
            self._uploader.shutdown()
            self._uploader = None
        return last

    def _commit(self, tmp: Path, final: Location, meta: CheckpointMeta, rng: dict, writer=None) -> Location | None:
        """Every rank: its RNG file, and the manifest entries of the files it wrote (digests taken while
        writing; one all_gather per save). Rank 0: the run's config and tokenizer (run/), meta.json, the
        manifest; then locally the rename and retention. For object storage the upload starts here
        (in the background for an async save: None is returned, `poll` finishes it)."""
        start = time.perf_counter()
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        write_json_atomic(tmp / "rng" / f"rank_{self.rank:05d}.json", rng)
        dist.barrier()
        entries = [None] * dist.get_world_size()
        dist.all_gather_object(entries, rank_digests(tmp, self.rank, streamed_digests(writer, tmp)))

        def seal() -> None:
            self._copy_run_files(tmp / RUN_FILES)
            digests = {k: v for e in entries for k, v in e.items()}
            if self.remote:
                seal_directory(tmp, meta, digests)
                if exists(final):  # what an unfinished upload of this step left (never committed)
                    delete_checkpoint(final)
            else:
                commit_directory(tmp, final, meta, digests)
                prune(self.root, self.cfg, final)

        _together(seal if self.rank == 0 else None)
        self.last_commit_seconds = time.perf_counter() - start
        if not self.remote:
            return final
        if self.cfg.async_save:
            self._uploading = (tmp, final, self._uploader.submit(self._upload_mine, tmp, final))
            return None
        _together(lambda: self._upload_mine(tmp, final))
        return self._finish_upload(tmp, final)

    def _copy_run_files(self, dest: Path) -> None:
        """config.yaml and the tokenizer files, so that the checkpoint alone resumes, evaluates, exports.
        (A checkpointer used outside a run, by a benchmark, has no run files to copy.)"""
        if not (self.run_dir / CONFIG).is_file():
            return
        if self._run_files is None:  # (read once: data.dir's manifest may be in object storage)
            self._run_files = [CONFIG, *tokenizer_files(load_run_config(self.run_dir))]
        for name in self._run_files:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.run_dir / name, dest / name)

    def _upload_mine(self, tmp: Path, final: Location) -> None:
        """This rank's share of the upload: the files it wrote; rank 0 also the others, but the manifest."""
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        for rel in files:
            owner = owner_of(rel)
            if owner == self.rank or (owner is None and self.rank == 0 and rel != MANIFEST):
                upload(tmp / rel, final / rel)

    def _finish_upload(self, tmp: Path, final: Location) -> Location:
        """Every rank has uploaded its files: rank 0 uploads the manifest (the commit) and applies retention;
        the staging copy goes."""
        start = time.perf_counter()

        def commit() -> None:
            upload(tmp / MANIFEST, final / MANIFEST)
            prune(self.root, self.cfg, final)

        _together(commit if self.rank == 0 else None)
        shutil.rmtree(tmp, ignore_errors=True)
        self.last_commit_seconds += time.perf_counter() - start
        return final

    def load(self, path: str | Path, parts: list[nn.Module], optimizers=None) -> CheckpointMeta:
        """Load weights (and optimizer state and this rank's RNG streams, when given) into the
        already-parallelized model parts, from a checkpoint that megacore.checkpoint.resume accepted
        for this run. Any layout loads any other layout's checkpoint."""
        path = location(path)
        meta = read_meta(path)
        self._read_state(path, meta, parts, optimizers)
        rng_file = path / "rng" / f"rank_{self.rank:05d}.json"
        if optimizers is not None and meta.world_size == dist.get_world_size() and exists(rng_file):
            # Same world size: every rank continues its own random streams. Otherwise they restart
            # from the seed (only model.dropout draws from them in training).
            set_rng_state(json.loads(rng_file.read_text()))
        return meta


def load_sharded_weights(parts: list[nn.Module], ckpt: Path) -> None:
    """Model weights of a torch-backend checkpoint (any layout) into this rank's parallelized parts: DCP
    reads only the slices that this rank's shards need."""
    state, keys = _state(parts, None)
    load_dcp(state, ckpt)
    for i, part in enumerate(parts):
        set_model_state_dict(part, {k: state["model"][k] for k in keys[i][0]}, options=_OPTIONS)


def load_dcp_weights(model: nn.Module, ckpt: Path) -> None:
    """Whole-model weights of a torch-backend checkpoint into an unparallelized model; DCP reshards, so
    any layout's checkpoint loads on one process (with or without a process group)."""
    import warnings

    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        # A deliberate single-process load; DCP warns about that even when told so.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_dcp(state, ckpt, no_dist=not dist.is_initialized())
    model.load_state_dict(state["model"])


def _together(work=None) -> None:
    """Run `work` (on the ranks that have some), then agree with every rank: when any failed, all raise
    (the failing one its own error), so that no rank waits in a later collective for one that stopped.
    One all-reduce; it is also the barrier."""
    error = None
    if work is not None:
        try:
            work()
        except Exception as e:  # (raised below, after every rank has heard of it)
            error = e
    ok = torch.tensor([0 if error is not None else 1])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if error is not None:
        raise error
    if not ok.numpy()[0]:
        raise CheckpointError("the checkpoint could not be written or uploaded on another rank (its log names the "
                              "cause); the previous checkpoint stays the newest")


def _all_done(future: Future, block: bool) -> bool:
    """Whether every rank's background work is done (one all-reduce; block: wait for this rank's)."""
    if block:
        wait([future])  # (an error is raised by the caller's result(), after every rank has agreed)
    # A host tensor (gloo on CUDA jobs too): read through numpy, the device is not involved.
    done = torch.tensor([1 if future.done() else 0])
    dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done.numpy()[0])


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
