"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the data-parallel
mesh; with a 2-D (replicate, shard) mesh it is HSDP: sharded within a group, replicated across."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, bf16: bool, reshard_after_forward: bool = True) -> None:
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    # Shard each block on its own so only one block's full weights are materialised at a time.
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
