"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the data-parallel
mesh; with a 2-D (replicate, shard) mesh it is HSDP: sharded within a group, replicated across."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, bf16: bool, pipelined: bool = False, lean: bool = False) -> None:
    """Each block is its own FSDP unit, so only one block's full weights are materialised at a time;
    the model is the root unit.

    Default: the root holds the embedding, final norm and output head. Without pipelining every unit
    reshards its weights after forward; pipeline stages keep them gathered, and their gradients
    unsharded, across the step's micro-batches (fewer all-gathers, as torchtitan does).
    Lean (parallel.fsdp_reshard=always): the embedding, the final norm and the head are units of their
    own and the root holds nothing; every unit reshards after each forward and backward and
    reduce-scatters its gradients on every micro-batch, so memory scales with the shard, at the cost of
    gathering the weights again for each micro-batch (the pipeline schedule is then given the stage
    without its FSDP root: megacore/parallel/pipeline.py).
    """
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    reshard = True if lean else not pipelined
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    if lean and not model.cfg.tie_embeddings:  # (a tied weight stays with the root that holds both uses)
        for module in (model.tok_embeddings, model.norm, model.output):
            if module is not None:
                fully_shard(module, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
