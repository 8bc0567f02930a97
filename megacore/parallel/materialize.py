"""From a parallelized model on the meta device to real local shards, initialised or loaded.

The model is built on `meta` (no memory), pipeline-split, tensor-parallelized and FSDP-sharded there;
then each rank allocates only the slices it holds (`to_empty`) and fills them: with the
layout-independent initialisation (megacore/model/init.py), or straight from a checkpoint or a Hugging
Face directory, slice by slice (megacore/checkpoint/weights.py). No rank ever holds the full model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from megacore.model.init import init_slice
from megacore.model.llama import Llama

# Wrapper modules that insert a level into parameter names (activation checkpointing, torch.compile).
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """A parameter's name in the whole, unwrapped model (the name checkpoints and init keys use)."""
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def local_slice(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(this rank's local tensor, the global shape, the local slice's offset in it) of a parameter."""
    if isinstance(p, DTensor):
        local = p.to_local()
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if tuple(shape) != tuple(local.shape):
            raise AssertionError(f"local shard {tuple(local.shape)} is not the box {tuple(shape)} at {offset}")
        return local, tuple(p.shape), tuple(offset)
    return p, tuple(p.shape), (0,) * p.dim()


def local_parameters(part: nn.Module) -> Iterator[tuple[str, torch.Tensor, tuple[int, ...], tuple[int, ...]]]:
    """(canonical name, local tensor, global shape, offset) of every parameter of a model part."""
    for name, p in part.named_parameters():
        local, shape, offset = local_slice(p.data if not isinstance(p, DTensor) else p)
        yield canonical_name(name), local, shape, offset


@torch.no_grad()
def materialize(parts: list[Llama], device: torch.device, seed: int) -> None:
    """Allocate each part's local shards on `device` and initialise them as one unsplit model would be."""
    for part in parts:
        part.to_empty(device=device)
        for name, local, shape, offset in local_parameters(part):
            init_slice(local, name, shape, offset, part.init_std(name), seed)
        part.init_buffers()


@torch.no_grad()
def load_slices(parts: list[nn.Module], read) -> None:
    """Fill every local shard from `read(name, global_shape, offset, local_shape)`, which returns just
    that slice of the named weight (a safetensors slice, a piece of a consolidated tensor)."""
    for part in parts:
        for name, local, shape, offset in local_parameters(part):
            local.copy_(read(name, shape, offset, tuple(local.shape)))

