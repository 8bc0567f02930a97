"""sha256 of checkpoint files where they are written, so a commit costs what one rank writes, not the total.

A checkpoint's manifest lists every file's size and sha256. Rank 0 alone hashing every byte after the
barrier (earlier versions) costs minutes at 8B parameters and about 15 at 70B while every other rank
waits. Instead:

1. DCP's writer streams each shard file through a hashing wrapper (`hashing_writer`): the digest is
   taken from the bytes on their way to the file, in the writing thread (for async saves, in the
   background), and nothing is read back.
2. At commit, each rank adds the files it owns that the writer did not hash (its RNG streams, or a file
   written with a seek) and checks the recorded sizes (`rank_digests`).
3. One all_gather of those entries (once per save, never per step) gives rank 0 the manifest; it
   hashes only what no rank claimed (DCP's .metadata, meta.json).

Verification at resume hashes the files on a thread pool (store.hash_files): hashlib releases the GIL.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from megacore.checkpoint.store import hash_files

# Which rank wrote a file, from its name: DCP's shard files, our RNG files, DeepSpeed's ZeRO partitions.
_OWNER = [re.compile(r"^__(\d+)_\d+\.distcp$"), re.compile(r"^rng/rank_(\d+)\.json$"),
          re.compile(r"(?:^|/)zero_pp_rank_(\d+)_")]


def owner_of(relpath: str) -> int | None:
    """The rank that wrote `relpath` (relative to the checkpoint directory), or None: rank 0 hashes it."""
    for pattern in _OWNER:
        m = pattern.search(relpath)
        if m:
            return int(m.group(1))
    return None


class _HashingStream:
    """A file opened for writing that hashes what passes through write(); any seek or truncate marks the
    digest unusable (the file is then hashed from disk at commit)."""

    def __init__(self, f: io.IOBase):
        self._f, self._sha, self.nbytes, self.sequential = f, hashlib.sha256(), 0, True

    def write(self, b) -> int:
        n = self._f.write(b)
        view = memoryview(b).cast("B")
        self._sha.update(view[:n] if n is not None and n < view.nbytes else view)
        self.nbytes += n if n is not None else view.nbytes
        return n

    def seek(self, *args):
        self.sequential = False
        return self._f.seek(*args)

    def truncate(self, *args):
        self.sequential = False
        return self._f.truncate(*args)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def __getattr__(self, name):  # tell, flush, fileno, close, ...
        return getattr(self._f, name)


class _HashingFileSystem(FileSystem):
    def __init__(self):
        super().__init__()
        self.digests: dict[Path, dict] = {}
        self._lock = threading.Lock()  # DCP may write files from several threads

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as f:
            if "w" not in mode:
                yield f
                return
            stream = _HashingStream(f)
            yield stream
        if stream.sequential:
            with self._lock:
                self.digests[Path(path)] = {"bytes": stream.nbytes, "sha256": stream.hexdigest()}


def hashing_writer(path: str | Path) -> FileSystemWriter:
    """DCP's file-system writer for `path`, recording each file's size and sha256 as it writes it."""
    writer = FileSystemWriter(str(path))
    writer.fs = _HashingFileSystem()
    return writer


def streamed_digests(writer: FileSystemWriter | None, root: Path) -> dict[str, dict]:
    """What `hashing_writer` recorded, relative to `root`, for files that still exist with that size."""
    out = {}
    for path, info in (getattr(writer.fs, "digests", {}) if writer is not None else {}).items():
        if path.is_file() and path.stat().st_size == info["bytes"]:
            out[str(path.relative_to(root))] = info
    return out


def rank_digests(root: Path, rank: int, streamed: dict[str, dict]) -> dict[str, dict]:
    """Manifest entries for the files under `root` that `rank` wrote: streamed digests where the writer
    took them, hashed here otherwise."""
    mine = [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file()]
    mine = [rel for rel in mine if owner_of(rel) == rank]
    known = {rel: streamed[rel] for rel in mine if rel in streamed}
    return {**known, **hash_files(root, [rel for rel in mine if rel not in known], threads=1)}
