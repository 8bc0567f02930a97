"""The on-disk protocol every checkpoint follows, whatever backend wrote its files.

Commit: everything is written under `step_XXXXXXXX.tmp`; once all ranks are done, rank 0 writes
meta.json and manifest.json (every file's size and sha256, fsynced) and renames the directory. The
digests come from the ranks that wrote the files (megacore/checkpoint/digests.py); rank 0 hashes only
what none of them did. A directory with a
final name and a manifest is complete; a crash at any point leaves the previous checkpoint as the
newest. Loading verifies the manifest first, and `--resume auto` falls back to the newest good
checkpoint, saying which one was skipped and why.

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
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_pipeline.durable import fsync_dir, write_json_atomic
from data_pipeline.shards import file_sha256
from megacore.checkpoint.meta import META, CheckpointMeta, read_meta
from megacore.config import CheckpointConfig
from megacore.errors import CheckpointError
from megacore.run_dir import CHECKPOINTS

MANIFEST, LATEST, ABANDONED = "manifest.json", "latest", "abandoned"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed checkpoints of a run (final name and a manifest), oldest first; not yet verified."""
    root = checkpoints_root(run_dir)
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
    digests = hash_files(path, sorted(files))
    for name in sorted(files):
        if digests[name]["sha256"] != files[name]["sha256"]:
            raise CheckpointError(f"{path / name}: sha256 mismatch (altered)")


def hash_files(root: Path, relpaths: list[str], threads: int | None = None) -> dict[str, dict]:
    """{relpath: {bytes, sha256}} of files under `root`, on a thread pool (hashlib releases the GIL, so
    threads hash in parallel; time grows with the bytes over the threads, not with the file count)."""
    threads = threads or min(8, os.cpu_count() or 1)

    def one(rel: str) -> tuple[str, dict]:
        f = root / rel
        return rel, {"bytes": f.stat().st_size, "sha256": file_sha256(f)}

    if len(relpaths) <= 1 or threads == 1:
        return dict(map(one, relpaths))
    with ThreadPoolExecutor(threads) as pool:
        return dict(pool.map(one, relpaths))


def newest_good_checkpoint(run_dir: str | Path, log=print) -> Path | None:
    """The newest checkpoint that verifies; each skipped one is reported with its reason."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            log(f"warning: skipping checkpoint {path.name}: {e}")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (meaning its newest good checkpoint); verified."""
    path = Path(path)
    if (path / META).is_file():
        verify_checkpoint(path)
        return path
    found = newest_good_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    return found


def commit_directory(tmp: Path, final: Path, meta: CheckpointMeta, digests: dict[str, dict] | None = None) -> None:
    """Once every file of `tmp` is written: meta.json, then the manifest (fsynced), the rename. `digests`
    holds entries the writing ranks computed; rank 0 hashes the other files."""
    write_json_atomic(tmp / META, meta.to_dict())
    digests = dict(digests or {})
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    digests.update(hash_files(tmp, [rel for rel in files if rel not in digests]))
    write_json_atomic(tmp / MANIFEST, {"files": {rel: digests[rel] for rel in files}})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    (final.parent / LATEST).unlink(missing_ok=True)
    fsync_dir(final.parent)


def is_healthy(path: Path) -> bool:
    """Written outside a run of skipped steps (megacore/health/); checkpoints from before run health are."""
    return read_meta(path).healthy


def healthy_checkpoint_before(run_dir: str | Path, step: int) -> Path | None:
    """The newest healthy checkpoint before `step` that verifies (a rollback's target)."""
    for path in reversed(list_checkpoints(run_dir)):
        if step_of(path) < step and is_healthy(path):
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError:
                continue
    return None


def prune(run_dir: str | Path, cfg: CheckpointConfig, committed: Path) -> None:
    """After committing `committed`: keep it, the keep_last newest, every keep_every-th step for good, and
    the newest healthy one whatever keep_last says. Only checkpoints older than `committed` are
    candidates (newer ones were set aside at start)."""
    if cfg.keep_last <= 0:
        return
    older = [p for p in list_checkpoints(run_dir) if step_of(p) < step_of(committed)]
    newest_healthy = committed if is_healthy(committed) else next((p for p in reversed(older) if is_healthy(p)), None)
    for old in older[:max(0, len(older) - (cfg.keep_last - 1))]:
        if not (cfg.keep_every and step_of(old) % cfg.keep_every == 0) and old != newest_healthy:
            shutil.rmtree(old)


def set_aside_newer(run_dir: str | Path, step: int) -> list[Path]:
    """Move every committed checkpoint after `step` (the one this invocation continues from; 0: none)
    to checkpoints/abandoned/, under its name and the time it was set aside. Returns the new paths."""
    moved, root, stamp = [], checkpoints_root(run_dir), time.strftime("%Y%m%dT%H%M%S")
    for path in list_checkpoints(run_dir):
        if step_of(path) <= step:
            continue
        (root / ABANDONED).mkdir(exist_ok=True)
        target, n = root / ABANDONED / f"{path.name}.set-aside-{stamp}", 1
        while target.exists():
            n += 1
            target = root / ABANDONED / f"{path.name}.set-aside-{stamp}-{n}"
        os.replace(path, target)
        moved.append(target)
    if moved:
        fsync_dir(checkpoints_root(run_dir))
    return moved
