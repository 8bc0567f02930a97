"""Tensor parallelism with sequence parallelism, applied to the Llama model through DTensor plans.

As in Megatron-LM and torchtitan: the residual stream is sharded along the sequence between blocks
(norms run on sequence shards); attention and the MLP gather the sequence, run column-parallel input
projections (wq/wk/wv, w1/w3: each rank a slice of heads or hidden units) and row-parallel output
projections (wo, w2) that reduce-scatter back to sequence shards. The embedding is row-parallel over
the vocabulary and the output head column-parallel; its logits stay sharded over the vocabulary and
cross-entropy runs on the shards (torch's loss_parallel, megacore/parallel/parallelize.py).
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from megacore.model.llama import Llama


def apply_tensor_parallel(model: Llama, tp_mesh: DeviceMesh) -> None:
    top_plan = {}
    if model.tok_embeddings is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top_plan["norm"] = SequenceParallel()
    if model.output is not None:
        # Logits stay sharded over the vocabulary: the loss runs on the shards (loss_parallel).
        top_plan["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, top_plan)

    # Block inputs after the first stage arrive as local sequence shards too.
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })
