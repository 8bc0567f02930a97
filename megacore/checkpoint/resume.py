"""Which checkpoint a run resumes from, and whether it can: refused before any process starts.

`--resume none` refuses a run directory that already has checkpoints (its work would be overwritten);
`auto` takes the newest checkpoint that verifies; a path names a checkpoint or a run directory. A
checkpoint of another run starts a branch (an annealing decay from a stable-phase checkpoint, say): the
new run directory records it in branch.json, so `auto` continues from it until the branch has
checkpoints of its own (a requeue before the first save does not start from scratch). The
compatibility of that checkpoint with this launch is checked in one place, `check_can_resume`: by the
CLI before torchrun starts (cheap: meta.json only), and by the trainer on rank 0 after the ranks have
verified it together (`checkpoint_to_resume`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_pipeline.durable import write_text_atomic
from data_pipeline.shards import read_manifest
from data_pipeline.storage import Location, is_url, location
from megacore.checkpoint.meta import CheckpointMeta, read_meta
from megacore.checkpoint.store import (
    checkpoints_root,
    is_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from megacore.config import Config
from megacore.errors import CheckpointError, DataError
from megacore.run_dir import BRANCH, CHECKPOINTS


def check_compatible(ckpt: Path, meta: CheckpointMeta, backend: str, world_size: int) -> None:
    """Refuse a checkpoint this launch cannot continue: another backend, weights without optimizer state,
    or a DeepSpeed checkpoint on another world size (torch-backend checkpoints reshard to any)."""
    saved = meta.backend
    if saved != backend:
        raise CheckpointError(f"{ckpt} was written with parallel.backend={saved}, this run has "
                              f"parallel.backend={backend}; use train.init_from={ckpt} (weights only)")
    if meta.weights_only:
        raise CheckpointError(f"{ckpt}: holds weights only (no optimizer state); start a new run with "
                              f"train.init_from={ckpt}")
    if backend == "deepspeed" and meta.world_size != world_size:
        raise CheckpointError(f"{ckpt}: a DeepSpeed checkpoint written by {meta.world_size} ranks resumes "
                              f"only on that many (this launch has {world_size}); use train.init_from={ckpt} "
                              f"(weights only) or parallel.backend=torch, whose checkpoints reshard")


def check_same_data(ckpt: Path, meta: CheckpointMeta, cfg: Config) -> None:
    """Refuse to continue a run on other data: the loader's position only means something on the token
    stream it was counted in (the fingerprints of the prepared directories, and the window length)."""
    loader = meta.loader
    mixture = cfg.data.mixture_weights() or [(cfg.data.dir, 1.0)]
    now = [read_manifest(d)["fingerprint"] for d, _ in mixture]
    if loader.get("fingerprints") is not None and loader["fingerprints"] != now:
        raise DataError(f"{ckpt} was trained on data with fingerprint(s) {loader['fingerprints']}, but "
                        f"{', '.join(d for d, _ in mixture)} now has {now}: the data changed since the checkpoint "
                        f"(prepared again from changed sources?). Resume on the data it was trained on, or start "
                        f"a new run with train.init_from={ckpt}")
    if loader.get("seq_len") not in (None, cfg.data.seq_len):
        raise DataError(f"{ckpt} was trained with data.seq_len={loader['seq_len']}, this run has "
                        f"data.seq_len={cfg.data.seq_len}; start a new run with train.init_from={ckpt}")


def check_can_resume(ckpt: Path, cfg: Config, world_size: int) -> CheckpointMeta:
    """Both checks, before launch (on the newest checkpoint) and on rank 0 (on the verified one); returns
    the checkpoint's metadata."""
    meta = read_meta(ckpt)
    check_compatible(ckpt, meta, cfg.parallel.backend, world_size)
    check_same_data(ckpt, meta, cfg)
    return meta


def effective_resume(resume: str) -> str:
    """torchrun restarting the group after a failure means: continue where it stopped."""
    return "auto" if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 else resume


def run_checkpoints(cfg: Config) -> Location:
    """This run's checkpoints root: checkpoint.dir, or RUN_DIR/checkpoints."""
    return checkpoints_root(cfg.train.run_dir, cfg.checkpoint.dir)


def checkpoint_to_resume(cfg: Config, resume: str, env, say=print) -> Location | None:
    """The verified checkpoint that `--resume` selects, or None to start fresh (raises if that would lose
    work). On every rank of a run: rank 0 lists the candidates (resume_candidates), every rank verifies its
    share of each (1/world of its bytes: at 70B with optimizer state, about 840 GB shared out instead of
    read by one process) until one verifies; one all_gather per candidate tried. Every rank raises together
    when the resume may not start fresh."""
    import torch.distributed as dist

    from megacore.distributed import on_every_rank

    listed = [on_every_rank(lambda: resume_candidates(cfg, resume) if env.is_main else None, env)]
    dist.broadcast_object_list(listed, src=0)
    paths, fresh_ok = listed[0]
    error = None
    for path in paths:
        try:
            verify_checkpoint(path, part=(env.rank, env.world_size))
            mine = None
        except CheckpointError as e:
            mine = str(e)
        errors = [None] * env.world_size
        dist.all_gather_object(errors, mine)
        error = next((e for e in errors if e is not None), None)
        if error is None:
            return path
        if env.is_main:
            say(f"warning: skipping checkpoint {path.name}: {error}")
    if error is not None and not fresh_ok:
        on_every_rank(lambda: _refuse(error) if env.is_main else None, env)
    return None


def _refuse(error: str) -> None:
    raise CheckpointError(error)


def resume_candidates(cfg: Config, resume: str) -> tuple[list[Location], bool]:
    """What `--resume` may continue from, newest first, not yet verified (the first that verifies is taken),
    and whether the run may start fresh when none does: `auto` may (each skip is said), unless the last
    candidate is the checkpoint this run branched from; an explicit checkpoint or run may not. `none`
    gives no candidate, and raises if starting fresh would lose work. `auto` looks in checkpoint.dir, so a
    node with an empty run directory continues from object storage."""
    run_dir, root = cfg.train.run_dir, run_checkpoints(cfg)
    if resume == "none":
        # (also the run directory's own checkpoints/, when checkpoint.dir now names another place)
        existing = latest_checkpoint(root) or (latest_checkpoint(Path(run_dir) / CHECKPOINTS) if cfg.checkpoint.dir
                                               else None)
        if existing is not None:
            where = run_dir if isinstance(root, Path) else f"checkpoint.dir={root}"
            raise FileExistsError(f"{where} already has checkpoints (newest: {existing.name}); pass "
                                  f"--resume auto to continue it, or choose another train.run_dir"
                                  f"{'' if isinstance(root, Path) else ' and checkpoint.dir'}")
        if branch_point(run_dir) is not None:
            raise FileExistsError(f"{run_dir} is a branch of {branch_point(run_dir)} ({Path(run_dir) / BRANCH}); pass "
                                  f"--resume auto to continue it, or choose another train.run_dir")
        return [], True
    if resume == "auto":
        branch = branch_point(run_dir)
        return [*reversed(list_checkpoints(root)), *([branch] if branch is not None else [])], branch is None
    path = location(resume)
    if is_checkpoint(path):
        return [path], False
    found = list(reversed(list_checkpoints(path)))
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    return found, False


def branch_point(run_dir: str | Path) -> Location | None:
    """The checkpoint of another run that this run directory branched from (None: not a branch)."""
    path = Path(run_dir) / BRANCH
    if not path.is_file():
        return None
    try:
        return location(json.loads(path.read_text())["from"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: not a branch record ({{\"from\": CHECKPOINT, \"step\": N}}); restore it "
                              f"or remove it") from None


def is_branch(ckpt: Location, cfg: Config) -> bool:
    """Whether resuming `ckpt` in this run starts a branch: the checkpoint is not under this run's
    checkpoints root (followed through symlinks: checkpoints on scratch storage are still the run's)."""
    root = run_checkpoints(cfg)
    if is_url(root) or is_url(ckpt):
        return str(ckpt.parent).rstrip("/") != str(root).rstrip("/")
    return root.resolve() not in ckpt.resolve().parents


def record_branch(ckpt: Location, step: int, run_dir: str | Path) -> None:
    """branch.json in the branch's run directory: where it came from (atomically; a later explicit
    `--resume` of another checkpoint replaces it)."""
    path = Path(run_dir) / BRANCH
    record = {"from": str(ckpt if is_url(ckpt) else ckpt.resolve()), "step": step}
    if not path.is_file() or json.loads(path.read_text()) != record:
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def refuse_lost_work(cfg: Config, resume: str, world_size: int) -> None:
    """Before any process starts: refuse to overwrite a run's checkpoints, to resume from a path that is no
    checkpoint, or from one this launch cannot load. Cheap (no hashing); the ranks verify the chosen
    checkpoint when training starts."""
    if resume == "none":
        resume_candidates(cfg, resume)  # (raises if the run directory or checkpoint.dir has checkpoints)
        return
    ckpt = (latest_checkpoint(run_checkpoints(cfg)) or branch_point(cfg.train.run_dir)) if resume == "auto" \
        else location(resume)
    if ckpt is None:
        return
    check_can_resume(ckpt, cfg, world_size)
