"""A safetensors file written tensor by tensor: the header first (it needs only names, dtypes and shapes),
then each tensor's bytes as it is read, so a 5 GB shard of a 70B export never sits in memory whole.

safetensors' own writer (`save_file`) takes every tensor of a file at once. The bytes written here are
exactly its bytes (tests/test_export.py compares them for every dtype we write): the header is compact
JSON with `__metadata__` first and the tensors in data order, padded with spaces to a multiple of 8; the
data is laid out by dtype (safetensors' enum, highest first), then by name.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megacore.errors import CheckpointError

# safetensors' name for each dtype we write, and its rank in safetensors' dtype enum (data order: highest
# rank first).
_DTYPES = {torch.float32: ("F32", 2), torch.bfloat16: ("BF16", 1), torch.float16: ("F16", 0)}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file, before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * self.dtype.itemsize


def data_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The order in which safetensors lays out the tensors' data (and lists them in the header)."""
    for s in specs:
        if s.dtype not in _DTYPES:
            raise ValueError(f"{s.name}: dtype {s.dtype} is not one megacore writes to safetensors")
    return sorted(specs, key=lambda s: (-_DTYPES[s.dtype][1], s.name))


def header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header of a file holding `specs`."""
    entries, offset = {}, 0
    if metadata:
        entries["__metadata__"] = metadata
    for s in data_order(specs):
        entries[s.name] = {"dtype": _DTYPES[s.dtype][0], "shape": list(s.shape),
                           "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, specs: list[TensorSpec], read: Callable[[str], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write `specs` to `path`, calling `read(name)` for each tensor in data order (memory: one tensor,
    plus whatever `read` keeps)."""
    with open(path, "wb") as f:
        f.write(header(specs, metadata))
        for s in data_order(specs):
            tensor = read(s.name)
            if tuple(tensor.shape) != s.shape or tensor.dtype != s.dtype:
                raise CheckpointError(f"{path}: {s.name} is {tuple(tensor.shape)} {tensor.dtype}, the model needs "
                                      f"{s.shape} {s.dtype}")
            # Raw bytes, no copy (safetensors is little-endian, as every platform torch runs on).
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
