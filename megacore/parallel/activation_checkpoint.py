"""Activation checkpointing of transformer blocks.

full: keep only each block's input; recompute the block in the backward pass.
selective: keep the outputs of matmuls and attention, recompute the cheap elementwise ops (norms,
RoPE, SiLU, residual adds) that hold most of the activation memory per FLOP.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from megacore.model.attention import attention_kernels
from megacore.model.llama import Llama

# Matmuls, and every attention kernel SDPA or FlexAttention may pick on this machine (flash, memory-
# efficient, cuDNN on sm90, the CPU flash kernel, FlexAttention's higher-order op); the experts' grouped
# GEMMs and expert parallelism's token all-to-alls (recomputing those would repeat the exchange).
_SAVE = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default, *attention_kernels(),
         torch.ops.aten._grouped_mm.default, torch.ops._c10d_functional.all_to_all_single.default,
         torch.ops._c10d_functional.wait_tensor.default}


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Llama, mode: str) -> None:
    if mode == "none":
        return
    # The recompute must draw the dropout masks of the first forward: keep the RNG state for it (the
    # global stream advances as without checkpointing, so resume stays bitwise).
    kwargs = {"preserve_rng_state": True}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _policy)
    for name, block in list(model.layers.items()):
        # The wrapper's state-dict hooks keep parameter names unchanged (no _checkpoint_wrapped_module).
        model.layers[name] = checkpoint_wrapper(block, **kwargs)
