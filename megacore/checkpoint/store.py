"""The on-disk protocol every checkpoint follows, whatever backend wrote its files.

Commit: everything is written under `step_XXXXXXXX.tmp`; once all ranks are done, rank 0 writes
meta.json and manifest.json (every file's size and sha256, fsynced) and renames the directory. The
digests come from the ranks that wrote the files (megacore/checkpoint/digests.py); rank 0 hashes only
what none of them did. A directory with a
final name and a manifest is complete; a crash at any point leaves the previous checkpoint as the
newest. Loading verifies the manifest first (a run's ranks together, each a share of the files), and
`--resume auto` falls back to the newest good checkpoint, saying which one was skipped and why.

Object storage (checkpoint.dir=s3://..., any fsspec URL) has no rename: there every file is uploaded
under the step's final prefix and the manifest last (megacore/checkpoint/dcp.py), so a prefix without
its manifest is, as a `.tmp` directory is locally, not a checkpoint for resume, retention or export;
deletions remove the manifest first for the same reason. Each checkpoint also carries the run's
config.yaml and tokenizer files: a node with an empty run directory resumes from checkpoint.dir alone,
and eval, generate and export-hf need nothing else.

One line of history: a run that continues from any checkpoint but the newest (a rollback, or a fallback
past a corrupt one) first moves the newer ones to `checkpoints/abandoned/` (kept, never deleted), so
that the newest checkpoint is always the one this line of training wrote last. Retention then only
ever deletes older checkpoints than the one just committed. (Earlier versions also wrote a `latest`
pointer that nothing read; it is removed at the next commit.)
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_pipeline.durable import fsync_dir, write_json_atomic
from data_pipeline.storage import Location, exists, listing, location, remove_file, remove_tree, sha256_and_size, tree
from megacore.checkpoint.meta import META, CheckpointMeta, read_meta
from megacore.config import CheckpointConfig
from megacore.errors import CheckpointError
from megacore.run_dir import CHECKPOINTS, CONFIG

MANIFEST, LATEST, ABANDONED = "manifest.json", "latest", "abandoned"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Location) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def checkpoints_root(run_dir: str | Path, checkpoint_dir: str = "") -> Location:
    """Where a run's committed checkpoints live: checkpoint.dir (a path or URL), or RUN_DIR/checkpoints."""
    return location(checkpoint_dir) if checkpoint_dir else Path(run_dir) / CHECKPOINTS


def root_of(where: str | Location) -> Location:
    """The checkpoints root a user means by `where`: a run directory's (its config names checkpoint.dir), a
    directory holding checkpoints/, or `where` itself (a checkpoint.dir, local or in object storage)."""
    where = location(where)
    if isinstance(where, Path) and (where / CONFIG).is_file():
        return checkpoints_root(where, configured_checkpoint_dir(where))
    if isinstance(where, Path) and (where / CHECKPOINTS).is_dir():
        return where / CHECKPOINTS
    return where


def configured_checkpoint_dir(run_dir: Path) -> str:
    """checkpoint.dir as a run directory's config.yaml sets it ("": the default), read without validating the
    whole config (a run of an older version or another machine is listed as it is)."""
    import yaml

    try:
        raw = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
        return str(((raw.get("checkpoint") or {}).get("dir")) or "")
    except (yaml.YAMLError, AttributeError):
        return ""


def list_checkpoints(where: str | Location) -> list[Location]:
    """Committed checkpoints (final name and a manifest) under a run directory or checkpoints root, oldest
    first; not yet verified. (One listing, and one existence check per checkpoint: a handful of requests.)"""
    found = [p for p in listing(root_of(where)) if _STEP_DIR.match(p.name) and exists(p / MANIFEST)]
    return sorted(found, key=step_of)


def latest_checkpoint(where: str | Location) -> Location | None:
    found = list_checkpoints(where)
    return found[-1] if found else None


def verify_checkpoint(path: str | Location, part: tuple[int, int] = (0, 1)) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file. `part=(i, n)` hashes only
    files i, i + n, ... of the manifest (every size is still checked): n processes that each take a part
    verify the checkpoint together, each reading 1/n of its bytes (a resume: megacore/train/trainer.py)."""
    path = location(path)
    manifest_path = path / MANIFEST
    if not exists(manifest_path):
        raise CheckpointError(f"{path}: no {MANIFEST} (an incomplete checkpoint)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable ({e})") from None
    sizes = file_sizes(path)
    for name, info in files.items():
        if name not in sizes:
            raise CheckpointError(f"{path / name}: missing")
        if sizes[name] != info["bytes"]:
            raise CheckpointError(f"{path / name}: {sizes[name]} bytes, manifest says {info['bytes']} (truncated?)")
    mine = sorted(files)[part[0]::part[1]]
    digests = hash_files(path, mine)
    for name in mine:
        if digests[name]["sha256"] != files[name]["sha256"]:
            raise CheckpointError(f"{path / name}: sha256 mismatch (altered)")


def file_sizes(path: Location) -> dict[str, int]:
    """{relpath: bytes} of every file under a checkpoint (one recursive listing on a store)."""
    return {rel: info["size"] for rel, info in tree(path).items()}


def hash_files(root: Location, relpaths: list[str], threads: int | None = None) -> dict[str, dict]:
    """{relpath: {bytes, sha256}} of files under `root`, on a thread pool (hashlib releases the GIL, and a
    store's reads wait on the network, so threads overlap; time grows with the bytes over the threads,
    not with the file count)."""
    threads = threads or min(8, os.cpu_count() or 1)

    def one(rel: str) -> tuple[str, dict]:
        digest, size = sha256_and_size(root / rel)
        return rel, {"bytes": size, "sha256": digest}

    if len(relpaths) <= 1 or threads == 1:
        return dict(map(one, relpaths))
    with ThreadPoolExecutor(threads) as pool:
        return dict(pool.map(one, relpaths))


def newest_good_checkpoint(where: str | Location, log=print) -> Location | None:
    """The newest checkpoint that verifies; each skipped one is reported with its reason."""
    for path in reversed(list_checkpoints(where)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            log(f"warning: skipping checkpoint {path.name}: {e}")
    return None


def is_checkpoint(path: str | Location) -> bool:
    """`path` is one checkpoint (its meta.json is there), not a run directory or a checkpoints root."""
    return exists(location(path) / META)


def resolve_checkpoint(path: str | Location) -> Location:
    """Accept a checkpoint, a run directory or a checkpoints root, local or a URL (the latter two meaning
    their newest good checkpoint); verified."""
    path = location(path)
    if is_checkpoint(path):
        verify_checkpoint(path)
        return path
    found = newest_good_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    return found


def seal_directory(tmp: Path, meta: CheckpointMeta, digests: dict[str, dict] | None = None) -> None:
    """Once every file of `tmp` is written: meta.json, then the manifest (fsynced). `digests` holds entries
    the writing ranks computed; this process hashes the other files."""
    write_json_atomic(tmp / META, meta.to_dict())
    digests = dict(digests or {})
    here = {str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST}
    digests.update(hash_files(tmp, sorted(here - set(digests))))
    files = sorted(here | set(digests))  # (other nodes' files too, when the run directory is not shared)
    write_json_atomic(tmp / MANIFEST, {"files": {rel: digests[rel] for rel in files}})


def commit_directory(tmp: Path, final: Path, meta: CheckpointMeta, digests: dict[str, dict] | None = None) -> None:
    """A local commit: seal `tmp`, then rename it to `final` (replacing an older copy of that step)."""
    seal_directory(tmp, meta, digests)
    if final.exists():
        delete_checkpoint(final)
    os.replace(tmp, final)
    (final.parent / LATEST).unlink(missing_ok=True)
    fsync_dir(final.parent)


def delete_checkpoint(path: Location) -> None:
    """Its manifest first: a deletion cut short leaves an incomplete checkpoint, never one that looks whole."""
    remove_file(path / MANIFEST)
    remove_tree(path)


def is_healthy(path: Location) -> bool:
    """Written outside a run of skipped steps (megacore/health/); checkpoints from before run health are."""
    return read_meta(path).healthy


def healthy_checkpoint_before(where: str | Location, step: int) -> Location | None:
    """The newest healthy checkpoint before `step` that verifies (a rollback's target)."""
    for path in reversed(list_checkpoints(where)):
        if step_of(path) < step and is_healthy(path):
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError:
                continue
    return None


def prune(root: Location, cfg: CheckpointConfig, committed: Location) -> None:
    """After committing `committed`: keep it, the keep_last newest, every keep_every-th step for good, and
    the newest healthy one whatever keep_last says. Only checkpoints older than `committed` are
    candidates (newer ones were set aside at start). In object storage, the prefixes of older saves that
    never got their manifest (a process killed during an upload) go too."""
    if not isinstance(root, Path):
        for stale in listing(root):
            if _STEP_DIR.match(stale.name) and step_of(stale) < step_of(committed) and not exists(stale / MANIFEST):
                remove_tree(stale)
    if cfg.keep_last <= 0:
        return
    older = [p for p in list_checkpoints(root) if step_of(p) < step_of(committed)]
    newest_healthy = committed if is_healthy(committed) else next((p for p in reversed(older) if is_healthy(p)), None)
    for old in older[:max(0, len(older) - (cfg.keep_last - 1))]:
        if not (cfg.keep_every and step_of(old) % cfg.keep_every == 0) and old != newest_healthy:
            delete_checkpoint(old)


def set_aside_newer(where: str | Location, step: int) -> list[Location]:
    """Move every committed checkpoint after `step` (the one this invocation continues from; 0: none)
    to abandoned/ beside them, under its name and the time it was set aside. Returns the new paths. (In
    object storage a move is a server-side copy, manifest last, then the deletion, manifest first.)"""
    moved, root, stamp = [], root_of(where), time.strftime("%Y%m%dT%H%M%S")
    for path in list_checkpoints(root):
        if step_of(path) <= step:
            continue
        target, n = root / ABANDONED / f"{path.name}.set-aside-{stamp}", 1
        while exists(target):
            n += 1
            target = root / ABANDONED / f"{path.name}.set-aside-{stamp}-{n}"
        if isinstance(path, Path):
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
        else:
            _copy_prefix(path, target)
            delete_checkpoint(path)
        moved.append(target)
    if moved and isinstance(root, Path):
        fsync_dir(root)
    return moved


def _copy_prefix(src, dst) -> None:
    """A server-side copy of a checkpoint's objects, its manifest last."""
    names = sorted(file_sizes(src), key=lambda rel: rel == MANIFEST)
    for rel in names:
        src.fs.copy((src / rel).path, (dst / rel).path)
