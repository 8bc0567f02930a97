"""Loading checkpoints without executing anything they contain.

A checkpoint's manifest sits beside its files, so it proves integrity, not origin: anyone who can
write the directory can rewrite both. Every pickle a checkpoint holds is therefore read through an
allow-list of the classes DCP and our optimizer state need, and anything else is refused naming the
file and the class:

- DCP's `.metadata` (a pickle of its Metadata dataclasses): `SafeFileSystemReader` unpickles it with
  `RestrictedUnpickler`;
- DCP's non-tensor entries (optimizer hyperparameters: floats, bools, tuples), which torch's default
  planner reads with `torch.load(weights_only=False)`: `SafeLoadPlanner` reads them weights-only;
- tensors: DCP already reads them with `torch.load(weights_only=True)`;
- DeepSpeed's `*.pt` files, read by its engine and by `zero_to_fp32` with `weights_only=False`:
  `weights_only_torch_load()` makes every `torch.load` inside it weights-only, allowing the three plain
  data classes DeepSpeed stores (a stage enum, the loss scaler's settings, fragment addresses).
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from data_pipeline.storage import is_url
from megacore.errors import CheckpointError

_DCP_METADATA = {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": _DCP_METADATA,
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # looks a layout up by name
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only the classes of DCP's metadata (and torch dtypes)."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.source}: refused to load {module}.{name}: checkpoint metadata may only hold "
                              f"DCP's own classes (a tampered or foreign file?)")


class _SafeMetadata:
    """DCP's readers, with `.metadata` read through the allow-list. DCP swallows any error of
    read_metadata (to try per-rank metadata instead), so a refusal is also kept in `self.refused`."""

    refused: CheckpointError | None = None
    _metadata: Metadata | None = None  # kept: a streaming read loads one tensor per call (with its metadata)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is not None and kwargs.get("rank") is None:
            self._metadata.storage_meta.load_id = self.load_id
            return self._metadata
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = RestrictedUnpickler(f, str(path)).load()
            except CheckpointError as e:
                self.refused = e
                raise
        if not isinstance(metadata, Metadata):
            self.refused = CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
            raise self.refused
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        if kwargs.get("rank") is None:
            self._metadata = metadata
        return metadata


class SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    """A local checkpoint."""


class SafeFsspecReader(_SafeMetadata, FsspecReader):
    """A checkpoint in object storage: each rank reads the byte ranges of the tensors its shards need,
    straight from the store (nothing is downloaded whole)."""


def safe_reader(path) -> FileSystemReader:
    return SafeFsspecReader(str(path)) if is_url(path) else SafeFileSystemReader(path)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor entries read weights-only."""

    def __init__(self, checkpoint: str | pathlib.Path = "checkpoint"):
        super().__init__()
        self.checkpoint = str(checkpoint)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{self.checkpoint}: refused to load the entry {read_item.dest_index.fqn}: "
                                  f"{_reason(e)}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_dcp(state: dict, path: str | pathlib.Path, no_dist: bool = False, reader=None) -> None:
    """`torch.distributed.checkpoint.load` of `path` into `state`, through the allow-lists (`reader`: one
    from `safe_reader(path)` to reuse, with its metadata, across many loads)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = reader or safe_reader(path)
    quiet = _DropMetadataFallbackNotes()
    logging.getLogger().addFilter(quiet)
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(path), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # DCP's own exception derives from BaseException
        if reader.refused is not None:
            raise reader.refused from None
        # DCP wraps each rank's error as (exception, traceback).
        refused = [pair[0] for pair in getattr(e, "failures", {}).values() if isinstance(pair[0], CheckpointError)]
        if refused:
            raise refused[0] from None
        raise
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropMetadataFallbackNotes(logging.Filter):
    """DCP logs a traceback (on the root logger) each time it falls back from global to per-rank metadata;
    whatever made it fall back is reported by `load_dcp` itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Global metadata is not found", "Rank local metadata is not found"))


def _reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that names what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "refused")


def _deepspeed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load():
    """Within it, every `torch.load` (DeepSpeed's included) is weights-only with DeepSpeed's data classes
    allowed; a pickle that needs anything else is refused, naming the file."""
    original, allowed = torch.load, _deepspeed_globals()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{f}: refused to load: {_reason(e)}") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
