"""A cluster job planned on a laptop: the real model and the real parallel plan for any world size, on
the meta device, in one process.

For each pipeline rank, one process group of the job's world size is faked (torch's `fake` backend:
collectives return at once, nothing is allocated) and the model is built on meta and parallelized by
exactly the code a training rank runs (megacore/parallel/parallelize.py). Every parameter then carries
its global shape and its DTensor placements; the local shard of any rank follows from the rank's mesh
coordinates, without building anything again. What grows with what: one build per pp rank (a few
seconds at 70B), then one shape computation per distinct parameter shape and rank (layers repeat), a few seconds at
512 ranks.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from megacore.config import Config
from megacore.errors import UsageError
from megacore.loss import LanguageModelLoss
from megacore.model.llama import Llama
from megacore.parallel.layout import Layout
from megacore.parallel.materialize import canonical_name
from megacore.parallel.parallelize import apply_parallelism


@contextmanager
def _fake_group(rank: int, world_size: int):
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise UsageError("a parallel plan is made in a process without a process group of its own")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def planned_numels(cfg: Config, layout: Layout) -> list[dict[str, int]]:
    """For every rank: {parameter name of the whole model: elements that rank holds} under the real plan."""
    per_pp = layout.world_size // layout.pp  # pp is the outermost mesh dimension
    out: list[dict[str, int]] = [{} for _ in range(layout.world_size)]
    for pp_rank in range(layout.pp):
        with _fake_group(pp_rank * per_pp, layout.world_size):
            mesh = layout.build_mesh("cpu")
            with torch.device("meta"):
                model = Llama(cfg.model)
            params, loss = [], LanguageModelLoss.for_run(layout.tp, compiled=False)
            for _, part in apply_parallelism(model, cfg, layout, mesh, loss):
                for name, p in part.named_parameters():
                    if isinstance(p, DTensor):
                        params.append((canonical_name(name), tuple(p.shape), p.device_mesh.mesh_dim_names,
                                       tuple(p.device_mesh.shape), tuple(p.placements)))
                    else:
                        params.append((canonical_name(name), tuple(p.shape), None, None, None))
        # Layers repeat: one shape computation per distinct (shape, mesh, coordinate, placements).
        local_shapes: dict[tuple, tuple] = {}
        for rank in range(pp_rank * per_pp, (pp_rank + 1) * per_pp):
            coords = layout.coordinates(rank)
            for name, shape, dims, mesh_shape, placements in params:
                if dims is not None:
                    key = (shape, mesh_shape, tuple(coords[d] for d in dims), placements)
                    if key not in local_shapes:
                        local_shapes[key] = _compute_local_shape_and_global_offset(
                            shape, mesh_shape, list(key[2]), placements, skip_offset=True)[0]
                    shape = local_shapes[key]
                out[rank][name] = math.prod(shape)
    return out

