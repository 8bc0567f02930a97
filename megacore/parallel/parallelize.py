"""Applying parallelism to a model from the outside, on one device mesh pp x dp_replicate x dp_shard x cp x tp.

Order (as in torchtitan): pipeline split -> float8 -> tensor parallel -> context parallel (the attention
kernel) -> expert parallel (experts sharded over ep, tokens dispatched) -> activation checkpointing ->
compile -> FSDP/HSDP over dp_shard x cp (experts over what ep leaves of it) -> materialise. The
model arrives on the meta device and all of this happens there; only then does each rank allocate and
initialise the shards it holds (megacore/parallel/materialize.py),
with an initialisation that gives the same weights on every layout.

What comes out is this rank's model parts (pipeline stages) with their stage indices and the mesh; the
train module (megacore/train/module.py) runs batches through them and owns the loss and the optimizer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh

from megacore.config import Config
from megacore.loss import LanguageModelLoss
from megacore.model.llama import Llama
from megacore.parallel.activation_checkpoint import apply_activation_checkpointing
from megacore.parallel.context_parallel import apply_context_parallel
from megacore.parallel.expert_parallel import apply_expert_parallel
from megacore.parallel.fsdp import apply_fsdp
from megacore.parallel.layout import Layout
from megacore.parallel.materialize import materialize
from megacore.parallel.pipeline import split_into_stages
from megacore.parallel.tensor_parallel import apply_tensor_parallel


def autocast_policy(cfg: Config, layout: Layout, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where nothing else casts: FSDP's mixed-precision policy casts when dp > 1, and
    DeepSpeed's bf16 engine casts itself; fp32 runs need nothing."""
    if cfg.train.mixed_precision == "bf16" and layout.fsdp_size == 1 and layout.backend == "torch":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def apply_parallelism(model: Llama, cfg: Config, layout: Layout, mesh: DeviceMesh,
                      loss: LanguageModelLoss) -> list[tuple[int, Llama]]:
    """[(stage index, part)] of this rank with parallelism applied, all still on the meta device.
    `model` (on meta) is consumed; with pp > 1 only its config is used. The part holding the output
    head first gets the head `loss` computes with (megacore/loss.py)."""
    par = cfg.parallel
    compile_ = par.compile is True  # ("auto" is resolved for the device by the trainer; elsewhere: eager)
    if layout.pp > 1:
        stages = split_into_stages(model.cfg, mesh["pp"].get_local_rank(), layout.pp, layout.stages_per_rank)
    else:
        stages = [(0, model)]
    for _, part in stages:
        loss.prepare(part)
        if cfg.train.float8:
            from megacore.parallel.float8 import apply_float8

            apply_float8(part, fsdp=layout.fsdp_size > 1)
        if layout.tp > 1:
            apply_tensor_parallel(part, mesh["tp"])
        if layout.cp > 1:
            apply_context_parallel(part, mesh["cp"], par.cp_regather_kv)
        if layout.ep > 1:
            apply_expert_parallel(part, mesh["ep"])
        apply_activation_checkpointing(part, par.activation_checkpointing)
        if compile_:
            for block in part.layers.values():
                block.compile()
        if layout.fsdp_size > 1:
            apply_fsdp(part, layout.fsdp_mesh(mesh), cfg.train.mixed_precision == "bf16", pipelined=layout.pp > 1,
                       lean=layout.fsdp_lean, expert_mesh=layout.expert_fsdp_mesh(mesh) if layout.ep > 1 else None,
                       expert_divide=layout.fsdp_size, ep=layout.ep)
    return stages


@dataclass(frozen=True)
class Parallelized:
    """This rank's share of the model: its (stage index, part) pairs (one part without pipelining) on the
    device, with parallelism applied, and the device mesh it lives on."""

    stages: list[tuple[int, Llama]]
    mesh: DeviceMesh

    @property
    def parts(self) -> list[Llama]:
        return [part for _, part in self.stages]


def parallelize(model: Llama, cfg: Config, layout: Layout, mesh: DeviceMesh, device: torch.device,
                loss: LanguageModelLoss) -> Parallelized:
    """Parallelism applied to `model` (on the meta device, consumed), then this rank's shards allocated
    on `device` and initialised from cfg.train.seed. Loading weights (init_from, resume) comes after,
    into the shards."""
    stages = apply_parallelism(model, cfg, layout, mesh, loss)
    del model
    materialize([part for _, part in stages], device, cfg.train.seed)
    return Parallelized(stages, mesh)
