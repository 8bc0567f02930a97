"""Pipeline parallelism with `torch.distributed.pipelining`.

The model's layers are cut into pp x stages_per_rank stages of (nearly) equal layer counts; stage s
is a model built on the meta device (no memory, nothing copied) that keeps only its layers, the
embedding if s is first and the final norm and output head if s is last; it is materialised after
parallelism is applied, so a rank only ever allocates its own stages. Parameter names stay those of
the whole model (layers are keyed by their global index), so checkpoints load into any other layout.
Rank r of the pp dimension holds stages r, r + pp, r + 2 pp, ... (the looped placement of the
interleaved schedules).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from megacore.config import ModelConfig
from megacore.model.llama import Llama
from megacore.model.moe import moe_layers

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "interleaved_zb": ScheduleInterleavedZeroBubble}


def stage_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Layer indices of each stage; earlier stages take one more layer when the split is uneven."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        count = base + (1 if s < extra else 0)
        out.append(list(range(start, start + count)))
        start += count
    return out


def split_into_stages(cfg: ModelConfig, pp_rank: int, pp_size: int, stages_per_rank: int) -> list[tuple[int, Llama]]:
    """[(stage index, stage module on the meta device)] held by this pp rank."""
    n_stages = pp_size * stages_per_rank
    layers = stage_layers(cfg.n_layers, n_stages)
    out = []
    for stage in range(pp_rank, n_stages, pp_size):
        with torch.device("meta"):
            part = Llama(cfg)
        for name in list(part.layers.keys()):
            if int(name) not in layers[stage]:
                del part.layers[name]
        if stage != 0:
            part.tok_embeddings = None
        if stage != n_stages - 1:
            part.norm, part.output = None, None
        out.append((stage, part))
    return out


class _WithoutFSDPRoot(nn.Module):
    """A stage as the schedule sees it when FSDP reshards on every micro-batch: PipelineStage treats an
    FSDP root specially (weights kept gathered and gradients unsynced until the last micro-batch),
    which is what parallel.fsdp_reshard=always exists to avoid."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, *args, **kwargs):
        return self.stage(*args, **kwargs)


def _uncounted_metadata_pass(stage: PipelineStage, module: nn.Module) -> None:
    """At its first step torch's PipelineStage runs the stage once more, on placeholder tensors, to learn
    its shapes; the MoE routers' expert counts of that pass are not the step's (the balancing bias and
    the load metrics read them): they are put back as they were."""
    routers = [moe.router for _, moe in moe_layers(module)]
    infer = getattr(stage, "_forward_metadata_inference", None)
    if not routers or infer is None:
        return

    def without_counting(*args, **kwargs):
        before = [r.tokens_per_expert.clone() for r in routers]
        try:
            return infer(*args, **kwargs)
        finally:
            for router, counts in zip(routers, before):
                router.tokens_per_expert.copy_(counts)

    stage._forward_metadata_inference = without_counting


def build_schedule(stages: list[tuple[int, Llama]], n_stages: int, schedule: str, n_microbatches: int,
                   pp_mesh: DeviceMesh, device: torch.device, loss_fn, fsdp_lean: bool = False):
    pipeline_stages = [PipelineStage(_WithoutFSDPRoot(module) if fsdp_lean else module, index, n_stages, device,
                                     group=pp_mesh.get_group()) for index, module in stages]
    for stage, (_, module) in zip(pipeline_stages, stages):
        _uncounted_metadata_pass(stage, module)
    cls = SCHEDULES[schedule]
    # Our loss is already normalised by the global token count: no extra division by micro-batches.
    if schedule in ("gpipe", "1f1b"):
        return cls(pipeline_stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(pipeline_stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
