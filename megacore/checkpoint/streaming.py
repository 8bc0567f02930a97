"""A trained model's weights one tensor at a time: what `export-hf` and `checkpoints consolidate` stream
through, so that their memory is the tensors in flight, never the model (a 70B model is 280 GB in fp32).

Each source reads one whole tensor of our model by name, in fp32: a torch-backend checkpoint of any
layout (DCP reads just that tensor's chunks, its metadata read once), a DeepSpeed ZeRO checkpoint
(DeepSpeed's own reader in its lazy mode: ZeRO-3 files are memory-mapped and each tensor gathered from
the ranks' partitions on demand; ZeRO-1/2 replicate the weights, and DeepSpeed merges them whole), a
published Hugging Face directory (megacore/checkpoint/hf.py: safetensors, experts stacked), or a model
already in memory.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from megacore.checkpoint.meta import read_meta
from megacore.checkpoint.safe_load import load_dcp, safe_reader
from megacore.errors import CheckpointError


class Weights(Protocol):
    def read(self, name: str) -> torch.Tensor:
        """The whole fp32 tensor `name` (our model's state-dict name)."""


class ModelWeights:
    """A model in memory."""

    def __init__(self, model: nn.Module):
        self.state = model.state_dict()

    def read(self, name: str) -> torch.Tensor:
        return self.state[name].detach()


class DcpWeights:
    """A torch-backend checkpoint (any layout, any world size): each read loads one tensor's chunks."""

    def __init__(self, ckpt):
        self.ckpt, self.reader = ckpt, safe_reader(ckpt)
        entries = self.reader.read_metadata().state_dict_metadata
        # Flattened by DCP as "model.<name>" (the optimizer's entries are skipped).
        self.shapes = {key[len("model."):]: tuple(md.size) for key, md in entries.items()
                       if key.startswith("model.") and hasattr(md, "size")}

    def read(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise CheckpointError(f"{self.ckpt}: no weight {name} in the checkpoint")
        state = {"model": {name: torch.empty(self.shapes[name], dtype=torch.float32)}}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            # Each process reads on its own, with or without a process group: ranks that need different
            # tensors (ZeRO-3 partitions, some empty) never wait for one another.
            load_dcp(state, self.ckpt, no_dist=True, reader=self.reader)
        return state["model"][name]


class DeepSpeedWeights:
    """A DeepSpeed ZeRO checkpoint, read by DeepSpeed (weights-only: megacore/checkpoint/safe_load.py)."""

    def __init__(self, ckpt: Path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from megacore.checkpoint.safe_load import weights_only_torch_load

        self.ckpt = ckpt
        with weights_only_torch_load():
            self.state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.state:
            raise CheckpointError(f"{self.ckpt}: no weight {name} in the checkpoint")
        return self.state[name].contiguous().float()


def checkpoint_weights(ckpt) -> Weights:
    """The weights of a checkpoint of either backend (verified or chosen by the caller)."""
    if read_meta(ckpt).backend == "deepspeed":
        return DeepSpeedWeights(ckpt)
    return DcpWeights(ckpt)


def save_dcp_streaming(state: dict[str, torch.Tensor], read, directory: Path, dtype: torch.dtype) -> None:
    """A weights-only DCP checkpoint of one process in `directory`, {"model": state} where `state` holds
    meta tensors (names and shapes): DCP plans from them, and each tensor is read as DCP writes it. The
    files are those `dcp.save` writes for the model in memory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class Streaming(DefaultSavePlanner):
        """Reads each tensor when DCP asks for its data. DCP's file writer keeps every tensor it wrote
        (for its safetensors format), so the one written before is emptied when the next is read:
        `per_thread_copy_ahead=0` makes DCP ask for the next only after writing the last (its serial
        loader). tests/test_after_training.py compares the files with a whole-model save."""

        previous: torch.Tensor | None = None

        def resolve_data(self, write_item):
            if write_item.type.name == "BYTE_IO":
                return super().resolve_data(write_item)
            if self.previous is not None:
                self.previous.untyped_storage().resize_(0)
            name = write_item.index.fqn[len("model."):]
            self.previous = torch.empty(state[name].shape, dtype=dtype)  # (ours to empty, whatever `read` keeps)
            self.previous.copy_(read(name))
            return self.previous

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": {k: torch.empty(v.shape, dtype=dtype, device="meta") for k, v in state.items()}},
                 storage_writer=FileSystemWriter(directory, thread_count=1, per_thread_copy_ahead=0),
                 planner=Streaming(), no_dist=True)
