"""DeepSpeed ZeRO, the alternative to the torch backend: the same Llama, loader, loop and checkpoints.

`init_engine` wraps the model and the optimizer it is given in a ZeRO engine; the DeepSpeed train module
(megacore/train/deepspeed_module.py) drives it with the same batches, loss and loop as the torch backend.
ZeRO stage, offload, bf16, gradient accumulation and clipping come from our config; DeepSpeed's own JSON
config is derived, never written by hand. Its checkpoints are written by megacore/checkpoint/deepspeed.py,
around the same engine.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Shard

from megacore.config import Config
from megacore.model.init import normal_values
from megacore.model.llama import Llama
from megacore.parallel.layout import Layout


def deepspeed_config(cfg: Config, n_micro: int) -> dict:
    """DeepSpeed's config from ours (the batch arithmetic was checked by Layout.resolve)."""
    par = cfg.parallel
    pin = torch.cuda.is_available()
    zero: dict = {"stage": par.zero_stage}
    if par.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if par.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": n_micro,
        "gradient_clipping": cfg.optim.grad_clip,  # 0 disables, as ours
        "bf16": {"enabled": cfg.train.mixed_precision == "bf16"},
        "zero_optimization": zero,
        # Our AdamW (with the weight-decay mask) is the client optimizer.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our metrics logger reports
    }


def _start_deepspeed():
    import deepspeed

    # DeepSpeed's shared-memory CPU allreduce is a C++ op that costs a minute of compiling on every
    # fresh machine; the gloo group that megacore.distributed created does the collectives instead.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # ZeRO calls torch's older collective names on every step; the deprecation notice is not ours to act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter|all_gather)_", category=FutureWarning)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    return deepspeed


def build_partitioned(cfg: Config, layout: Layout, device: torch.device) -> Llama:
    """ZeRO-3: the model built under `deepspeed.zero.Init`, each parameter partitioned as soon as its
    module exists (no rank ever holds the whole model), and each rank's partition initialised with the
    layout-independent values of megacore/model/init.py (a partition is a range of the flattened
    parameter): the same weights as every torch layout."""
    deepspeed = _start_deepspeed()
    # The dtype comes from the config's bf16 flag. (Not `dtype=`: DeepSpeed 0.19's Init ignores it on an
    # accelerator without fp16, ours on CPU, and partitions in bf16.)
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, layout.n_micro)):
        model = Llama(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local, std = p.ds_tensor.view(-1), model.init_std(name)
            start, stop = partition_range(p)
            if stop <= start:
                continue
            if std is None or std == 0:  # norm weights: ones; biases: zeros
                local[:stop - start].fill_(1.0 if std is None else 0.0)
            else:
                local[:stop - start].copy_(normal_values(cfg.train.seed, name, p.ds_numel, start, stop, std,
                                                         local.device))
    return model


def partition_range(p, rank: int | None = None) -> tuple[int, int]:
    """[start, stop) of `rank`'s (default: this rank's) ZeRO-3 partition in the flattened parameter `p`
    (the last ranks' may be padding only: stop <= start)."""
    size = p.ds_tensor.numel()
    start = (dist.get_rank() if rank is None else rank) * size
    return start, min(p.ds_numel, start + size)


@torch.no_grad()
def load_partitions(model: nn.Module, read) -> None:
    """ZeRO-3 `train.init_from`: fill each rank's partition of every parameter from `read(name,
    global_shape, offset, local_shape)`, asked for the rows that cover the partition (the partition and at
    most two part rows more), never the whole model."""
    for name, p in model.named_parameters():
        start, stop = partition_range(p)
        if stop <= start:
            continue
        shape = tuple(p.ds_shape)
        row = math.prod(shape[1:])  # elements per row of dim 0 (1 for a vector)
        first, last = start // row, -(-stop // row)
        rows = read(name, shape, (first,) + (0,) * (len(shape) - 1), (last - first, *shape[1:]))
        p.ds_tensor.view(-1)[:stop - start].copy_(rows.reshape(-1)[start - first * row:stop - first * row])


def rows_of(rank: int, rows: int, world: int) -> tuple[int, int]:
    """(first row, row count) of `rank`'s Shard(0) piece of a tensor with `rows` rows over `world` ranks
    (torch.chunk's split: the pieces DCP reads for a Shard(0) DTensor)."""
    count, first = Shard.local_shard_size_and_offset(rows, world, rank)
    return int(first), int(count)


@torch.no_grad()
def partition_from_rows(p, piece: torch.Tensor) -> None:
    """ZeRO-3 parameter `p`'s partitions from the ranks' Shard(0) pieces of its full value (`piece`: this
    rank's rows): each rank sends every other the part of its rows that falls in that rank's partition,
    one all_to_all (the pieces and the partitions both split the flattened tensor into ranges, in order)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shape = tuple(p.ds_shape)
    row = math.prod(shape[1:])

    def overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
        return max(0, min(a[1], b[1]) - max(a[0], b[0]))

    def flat_rows(r: int) -> tuple[int, int]:
        first, count = rows_of(r, shape[0], world)
        return first * row, (first + count) * row

    send = [overlap(flat_rows(rank), partition_range(p, j)) for j in range(world)]
    receive = [overlap(flat_rows(i), partition_range(p, rank)) for i in range(world)]
    out = torch.empty(sum(receive), dtype=piece.dtype, device=piece.device)
    dist.all_to_all_single(out, piece.reshape(-1).contiguous(), receive, send)
    p.ds_tensor.view(-1)[:out.numel()].copy_(out)


def init_engine(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, layout: Layout):
    """`model` and its client optimizer wrapped in a ZeRO engine (DeepSpeed's config derived from ours)."""
    deepspeed = _start_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, layout.n_micro), dist_init_required=False)
    return engine
