"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the data-parallel
mesh; with a 2-D (replicate, shard) mesh it is HSDP: sharded within a group, replicated across."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from megacore.model.moe import moe_layers


def experts_shard_dim(experts_here: int, shards: int) -> int:
    """The dim FSDP shards stacked expert weights on: the experts (0), or, when there are fewer of them
    than shards, the rows of each (1): sharding 16 experts over 128 ranks on dim 0 would pad every rank
    to a whole expert, 8 times the memory and traffic (torchtitan's rule too)."""
    return 1 if shards > experts_here else 0


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, bf16: bool, pipelined: bool = False, lean: bool = False,
               expert_mesh: DeviceMesh | None = None, expert_divide: int = 1, ep: int = 1) -> None:
    """FSDP units as torchtitan cuts them: the embedding, each block, and the final norm with the output
    head; the root (the model) then holds no parameters of its own. Only one unit's full weights are
    gathered at a time, plus the head's.

    Default: each unit reshards its weights after forward and gathers them again for its backward,
    except the last (norm + head), whose backward starts right after its forward: it stays gathered.
    Pipeline stages keep every unit gathered, and gradients unsharded, across the step's micro-batches
    (fewer all-gathers, as torchtitan does).
    Lean (parallel.fsdp_reshard=always): every unit reshards after each forward and backward and
    reduce-scatters its gradients on every micro-batch, so memory scales with the shard, at the cost of
    gathering the weights again for each micro-batch (the pipeline schedule is then given the stage
    without its FSDP root: megacore/parallel/pipeline.py).
    With tied embeddings the one weight stays with the root, which then holds the embedding and head.
    Under expert parallelism (`expert_mesh`: the ranks that hold the same experts) each MoE layer's experts
    are a unit of their own on that mesh, whose gradient is divided by `expert_divide` (the whole
    data-parallel size: megacore/parallel/expert_parallel.py) instead of the mesh's size. Expert weights
    are sharded on the dim `experts_shard_dim` chooses.
    """
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    reshard = True if lean else not pipelined
    tied = model.cfg.tie_embeddings
    if model.tok_embeddings is not None and not tied:
        fully_shard(model.tok_embeddings, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    experts_here = model.cfg.n_experts // ep
    for block in model.layers.values():
        if expert_mesh is not None:
            dim = Shard(experts_shard_dim(experts_here, expert_mesh.size(-1)))
            for _, moe in moe_layers(block):
                fully_shard(moe.experts, mesh=expert_mesh, mp_policy=mp, reshard_after_forward=reshard,
                            shard_placement_fn=lambda p, dim=dim: dim)
                moe.experts.set_gradient_divide_factor(float(expert_divide))
                if expert_mesh.device_type == "cpu" and expert_mesh.size(-1) > 1:
                    # gloo has no pre-multiplied sum: sum, then divide. (A shard group of one rank divides
                    # as it copies, and must not be told to divide again.)
                    moe.experts.set_force_sum_reduction_for_comms(True)
        # Without expert parallelism the experts are in the block's unit, sharded by the same rule.
        expert_ids = set()
        if expert_mesh is None:
            for _, m in moe_layers(block):
                expert_ids |= {id(w) for w in (m.experts.w1, m.experts.w2, m.experts.w3)}
        dim = Shard(experts_shard_dim(experts_here, dp_mesh.size(-1)))
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard,
                    shard_placement_fn=lambda p, dim=dim, ids=expert_ids: dim if id(p) in ids else None)
    if model.output is not None and not tied:
        fully_shard([model.norm, model.output], mesh=dp_mesh, mp_policy=mp, reshard_after_forward=lean)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard and not tied)
