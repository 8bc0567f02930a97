"""Arrow token shards and the manifest that describes them.

A shard is an Arrow IPC file with one column `tokens` (list<uint16|uint32>), one row per document,
each ending in EOS; chat data adds `loss_mask` (list<uint8>, 1 where the token is a training target).
Its flat values are the packed token stream; its offsets are document boundaries.
Shards and the manifest are written with `durable.atomic_write`: a file that has its final name is complete.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.durable import atomic_write, read_json_object
from data_pipeline.errors import DataError, ShardError
from data_pipeline.upgrade import MANIFEST_VERSION, upgrade_manifest, upgrade_v1_settings

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
# MANIFEST_VERSION (2: data.character_coverage may be null) and the upgrade of older manifests when read
# are in data_pipeline/upgrade.py; both names stay importable from here.
__all__ = ["MANIFEST", "MANIFEST_VERSION", "TOKENIZER", "file_sha256", "fingerprint", "read_manifest", "read_shard",
           "token_dtype", "upgrade_v1_settings", "write_shard"]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: Path, values: np.ndarray, lengths: np.ndarray, loss_mask: np.ndarray | None = None) -> dict:
    """Write one shard atomically from the flat token values and per-document lengths (and, for chat
    data, a 0/1 loss weight per token); return its manifest record."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    columns = {"tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))}
    if loss_mask is not None:
        columns["loss_mask"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(loss_mask.astype(np.uint8)))
    table = pa.table(columns)
    with atomic_write(path, "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return {"file": path.name, "tokens": int(offsets[-1]), "documents": len(lengths), "sha256": file_sha256(path)}


def read_shard(path: Path, loss_mask: bool = False):
    """Memory-map a shard: (flat token values, document offsets), zero-copy views; with loss_mask, also
    the flat 0/1 loss weights (None when the shard has none: every token is trained)."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        column = table.column("tokens").combine_chunks()
        mask = table.column("loss_mask").combine_chunks() if "loss_mask" in table.column_names else None
    except (pa.ArrowInvalid, KeyError, OSError) as e:
        raise ShardError(f"corrupt or unreadable token shard {path}: {e}") from None
    values = column.values.to_numpy(zero_copy_only=True)
    offsets = column.offsets.to_numpy(zero_copy_only=True)
    if not loss_mask:
        return values, offsets
    return values, offsets, None if mask is None else mask.values.to_numpy(zero_copy_only=True)


def read_manifest(data_dir: str | Path) -> dict:
    """A prepared directory's manifest, local or in object storage, upgraded to this version."""
    from data_pipeline.storage import exists, is_url, location

    path = location(data_dir) / MANIFEST
    if not is_url(data_dir) and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data directory not found: {data_dir} (run `megacore data prepare` first)")
    if not exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in data directory {data_dir} (run `megacore data prepare` first)")
    return upgrade_manifest(read_json_object(path, DataError, "a manifest"), path)


def fingerprint(tokenizer_sha256: str, splits: dict) -> str:
    """Identity of the tokenized data: changes when any shard or the tokenizer changes."""
    digest = hashlib.sha256(tokenizer_sha256.encode())
    for split in sorted(splits):
        for shard in splits[split]["shards"]:
            digest.update(f"{split}/{shard['file']}/{shard['sha256']}".encode())
    return digest.hexdigest()[:16]
