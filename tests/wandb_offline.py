"""Reading W&B offline run files (RUN_DIR/wandb/offline-run-*/run-*.wandb) with wandb's own protobuf
records. wandb 0.31 ships no Python reader for the file's framing, which is LevelDB's log format:
a 7-byte header (":W&B", 0xBEE1, version), then 32 KiB blocks of records, each with a 7-byte header
(crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        out.append(record)
    return out


def read_run(path: Path) -> dict:
    """{"id", "config", "history": [{key: value}, ...], "alerts": [(title, text)]} of one offline run file."""
    run = {"id": None, "config": {}, "history": [], "alerts": []}
    for r in records(path):
        which = r.WhichOneof("record_type")
        if which == "run":
            run["id"] = r.run.run_id
            run["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif which == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif which == "alert":
            run["alerts"].append((r.alert.title, r.alert.text))
        elif which == "history":
            run["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return run


def offline_runs(run_dir: Path) -> list[dict]:
    """Every offline run file under RUN_DIR/wandb, oldest first."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    return [read_run(f) for f in files]
