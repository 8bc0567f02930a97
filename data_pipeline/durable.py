"""Durable, atomic file writes: a file with its final name is complete.

Every file megacore promises to keep (shards, manifests, tokenizers, checkpoint metadata, pointers, run
state) goes through `atomic_write`: written under PATH.tmp, flushed and fsynced, then renamed over PATH.
A crash leaves either the old file or the new one, never half of one; a failed write removes the tmp.
`read_json_object` reads such a JSON file back, naming it when it is not what was written.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from data_pipeline.storage import location


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w"):
    """`with atomic_write(path, "wb") as f: ...` writes f to PATH.tmp, fsyncs it and renames it to PATH."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj, indent: int | None = 2) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_object(path: str | Path, error: type[Exception], what: str = "a JSON object") -> dict:
    """The JSON object in `path`; `error` naming the file when it is not valid JSON or not an object
    (`what`: what the file should have been, for the message)."""
    try:
        value = json.loads(location(path).read_text())  # (a file in object storage too)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON: {e}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: not {what} (a JSON {type(value).__name__}, not an object)")
    return value
