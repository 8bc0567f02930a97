"""A trained model on N ranks, for `megacore eval --nproc N` and `megacore generate --nproc N`.

The model is built on the meta device with the run's parallel settings (or `parallel.KEY=VALUE`
overrides), sharded as for training, and each rank reads only its slices of the checkpoint or published
directory (as `train.init_from` does): no rank holds the whole model. It runs in fp32, uncompiled, as
the one-process path does, so that results equal one process's (the loss to 1e-5: only the order of
the sums differs; greedy generation token for token).

`eval_config` is also what the launcher checks before any process starts: a layout that does not fit N
ranks, or a batch that does not split over its data-parallel ranks, is refused by name there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megacore.config import Config, with_overrides
from megacore.errors import UsageError


def eval_config(cfg: Config, overrides: list[str], world_size: int, batch_size: int | None) -> Config:
    """The run's config for evaluating `batch_size` sequences per batch (None: generation, one sequence
    that every rank feeds) on `world_size` ranks: its parallel
    section with `overrides` (parallel.* only), the torch backend, fp32, no compile or activation
    checkpointing (nothing is trained), and each data-parallel rank's share of a batch as one micro-batch
    (one per pipeline micro-batch under pp)."""
    from megacore.parallel.layout import Layout

    for item in overrides:
        if not item.startswith("parallel."):
            raise UsageError(f"{item}: eval and generate take parallel.KEY=VALUE overrides only (the model and the "
                             f"data are the run's)")
    # A DeepSpeed run's weights load into the torch layout; the data-parallel sharding fills the ranks
    # the other degrees leave (unless set here).
    cfg = with_overrides(cfg, ["parallel.backend=torch", "parallel.offload_optimizer=false",
                               "parallel.offload_params=false", "parallel.dp_shard=-1", *overrides])
    cfg.parallel.compile, cfg.parallel.activation_checkpointing = False, "none"
    cfg.train.mixed_precision, cfg.train.float8 = "fp32", False
    cfg.train.global_batch_size, cfg.train.micro_batch_size = world_size, 1  # (the layout alone, first)
    layout = Layout.resolve(cfg, world_size)
    if batch_size is None:
        return cfg
    if batch_size % layout.dp_size:
        raise UsageError(f"--batch-size {batch_size} is not divisible by the {layout.dp_size} data-parallel ranks of "
                         f"{layout.describe()}")
    cfg.train.global_batch_size = batch_size
    cfg.train.micro_batch_size = batch_size // layout.dp_size if layout.pp == 1 else 1
    Layout.resolve(cfg, world_size)  # (a pipeline schedule's rule on micro-batches, named)
    return cfg


def sharded_module(cfg: Config, source: str, env):
    """This rank's evaluation module (megacore/train/torch_module.py, without optimizers) of the model in
    `source` (a checkpoint chosen on rank 0, or a published directory), sharded as `cfg.parallel` says."""
    from megacore.checkpoint.weights import load_weights_into_shards
    from megacore.distributed import on_every_rank
    from megacore.loss import LanguageModelLoss
    from megacore.model import Llama
    from megacore.parallel.layout import Layout
    from megacore.parallel.parallelize import parallelize
    from megacore.train.torch_module import TorchTrainModule

    layout = Layout.resolve(cfg, env.world_size)
    loss = LanguageModelLoss.for_run(layout.tp, compiled=False)
    with torch.device("meta"):
        model = Llama(cfg.model)
    mesh = layout.build_mesh(env.device.type)
    par = parallelize(model, cfg, layout, mesh, env.device, loss)
    on_every_rank(lambda: load_weights_into_shards(par.parts, source), env)
    return TorchTrainModule(par.stages, layout, env.rank, env.device, loss,
                            document_masking=cfg.model.document_masking,
                            pp_mesh=mesh["pp"] if layout.pp > 1 else None)


def agreed_token(token: int, device: torch.device) -> int:
    """Rank 0's sampled token, on every rank (all ranks draw from the same logits with the same seed; this
    keeps them in step even if one's floating point differed)."""
    t = torch.tensor([token], device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def check_generate_layout(cfg: Config) -> None:
    """Generation feeds one sequence, token by token, through the KV cache: data-parallel sharding (FSDP,
    HSDP) applies; tensor, pipeline and context parallelism do not (refused by name)."""
    par = cfg.parallel
    for key in ("tp", "pp", "cp", "ep"):
        if getattr(par, key) > 1:
            raise UsageError(f"generate --nproc shards the model with FSDP (parallel.dp_shard, dp_replicate); "
                             f"parallel.{key}={getattr(par, key)} does not apply to decoding one sequence token by "
                             f"token: set parallel.{key}=1")
