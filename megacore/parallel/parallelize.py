"""Applying parallelism to a model from the outside: FSDP2 (`fully_shard`) data parallelism.

The model is built whole on every rank with the same seed, so all layouts start from identical
weights; `fully_shard` then keeps each rank's shard of every parameter.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from megacore.config import Config
from megacore.distributed import DistEnv
from megacore.model.llama import Llama


def build_mesh(cfg: Config, env: DistEnv) -> DeviceMesh:
    cfg.parallel.check_world(env.world_size)
    return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("dp_shard",))


def parallelize(model: Llama, cfg: Config, mesh: DeviceMesh) -> Llama:
    if mesh.size() == 1:
        # One rank: nothing to shard; mixed precision comes from autocast in the train step.
        return model
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None,
        reduce_dtype=torch.float32,
    )
    # Shard each block on its own so only one block's full weights are materialised at a time.
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
