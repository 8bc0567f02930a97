"""Pipeline parallelism with `torch.distributed.pipelining`.

The model's layers are cut into pp x stages_per_rank stages of (nearly) equal layer counts; stage s
is a copy of the model that keeps only its layers, the embedding if s is first and the final norm
and output head if s is last. Parameter names stay those of the whole model (layers are keyed by
their global index), so checkpoints load into any other layout. Rank r of the pp dimension holds
stages r, r + pp, r + 2 pp, ... (the looped placement of the interleaved schedules).
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from megacore.model.llama import Llama

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


def split_into_stages(model: Llama, pp_rank: int, pp_size: int, stages_per_rank: int) -> list[tuple[int, Llama]]:
    """[(stage index, stage module)] held by this pp rank."""
    n_stages = pp_size * stages_per_rank
    layers = stage_layers(model.cfg.n_layers, n_stages)
    out = []
    for stage in range(pp_rank, n_stages, pp_size):
        part = copy.deepcopy(model)
        for name in list(part.layers.keys()):
            if int(name) not in layers[stage]:
                del part.layers[name]
        if stage != 0:
            part.tok_embeddings = None
        if stage != n_stages - 1:
            part.norm, part.output = None, None
        out.append((stage, part))
    return out


def build_schedule(stages: list[tuple[int, Llama]], n_stages: int, schedule: str, n_microbatches: int,
                   pp_mesh: DeviceMesh, device: torch.device, loss_fn):
    pipeline_stages = [PipelineStage(module, index, n_stages, device, group=pp_mesh.get_group())
                       for index, module in stages]
    cls = SCHEDULES[schedule]
    # Our loss is already normalised by the global token count: no extra division by micro-batches.
    if schedule in ("gpipe", "1f1b"):
        return cls(pipeline_stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(pipeline_stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
