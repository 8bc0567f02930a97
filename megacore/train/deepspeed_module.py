"""The DeepSpeed backend's train module: the same model, loss (megacore/loss.py), batches and loop as the
torch backend, inside a ZeRO engine (megacore/parallel/deepspeed.py), with DeepSpeed's checkpoints
(megacore/checkpoint/deepspeed.py). Every rank is a data-parallel rank.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megacore.checkpoint.deepspeed import DeepSpeedCheckpointer
from megacore.checkpoint.meta import CheckpointMeta
from megacore.checkpoint.weights import empty_model, init_source, init_weights_from, load_weights_into_partitions
from megacore.config import Config
from megacore.distributed import DistEnv, on_every_rank
from megacore.loss import LanguageModelLoss, LossSums, row_sums
from megacore.parallel.deepspeed import build_partitioned, init_engine
from megacore.parallel.layout import Layout
from megacore.train.data import micro_batches
from megacore.train.optim import param_groups


def build_deepspeed_module(cfg: Config, layout: Layout, env: DistEnv, init_from: str | None) -> DeepSpeedTrainModule:
    """ZeRO-3 partitions at construction; ZeRO-1/2 replicate the weights anyway, so their model is
    materialised whole. Both start from the initialisation of every torch layout. `init_from` weights
    are read into ZeRO-3's partitions, each rank its own; into ZeRO-1/2's whole model otherwise."""
    if cfg.parallel.zero_stage == 3:
        model = build_partitioned(cfg, layout, env.device)
        if init_from:
            source = init_source(cfg, env)  # (checked and verified once; fetched once per node)
            on_every_rank(lambda: load_weights_into_partitions(model, source), env)
    else:
        model = empty_model(cfg, env.device)
        model.init_weights(cfg.train.seed)
        if init_from:
            init_weights_from(model, init_source(cfg, env))
    loss = LanguageModelLoss.for_run(tp=1, compiled=False)
    loss.prepare(model)
    engine = init_engine(model, _optimizer(model, cfg), cfg, layout)
    return DeepSpeedTrainModule(engine, loss, layout.n_micro, env.device, cfg.model.document_masking,
                                DeepSpeedCheckpointer(cfg.train.run_dir, cfg.checkpoint, env.rank, engine))


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The engine's client optimizer: our AdamW with its weight-decay mask (megacore/train/optim.py), or
    DeepSpeed's CPU Adam when the optimizer state is offloaded."""
    groups = param_groups(model, cfg.optim.weight_decay)
    kw = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    if cfg.parallel.offload_optimizer:
        # ZeRO-Offload steps on the CPU with DeepSpeed's vectorised Adam (a C++ op, built on first use).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=True, **kw)


class _EngineOptimizer:
    """The optimizer whose state this rank keeps (the memory report reads `optimizers`)."""

    def __init__(self, engine):
        self.optimizers = [engine.optimizer.optimizer]


class DeepSpeedTrainModule:
    """The engine behind the train-module protocol (megacore/train/module.py)."""

    reports_loss = counts_tokens = True
    routing: dict = {}  # (dense models only: megacore/preflight.py)

    def __init__(self, engine, loss: LanguageModelLoss, n_micro: int, device: torch.device, document_masking: bool,
                 checkpointer: DeepSpeedCheckpointer):
        self.engine, self.loss, self.n_micro, self.device = engine, loss, n_micro, device
        self.document_masking, self.checkpointer = document_masking, checkpointer
        self.parts = [engine.module]
        self.optimizers = _EngineOptimizer(engine)
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.grad_average_size = self.dp_size

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def _output(self, x, pos) -> torch.Tensor:
        return self.engine(x, pos, return_hidden=self.loss.wants_hidden)

    def train_batch(self, batch: dict, scale: float) -> torch.Tensor:
        """As the torch backend; DeepSpeed averages over ranks like FSDP, and its own 1/accumulation
        scaling is turned off because `scale` already normalises."""
        total = torch.zeros((), device=self.device)
        for i, (x, y, pos) in enumerate(micro_batches(batch, self.n_micro, self.device, self.document_masking)):
            micro_loss = self.loss(self.engine.module.output, self._output(x, pos), y)
            self.engine.backward(micro_loss * scale, scale_wrt_gas=False)
            if i < self.n_micro - 1:
                self.engine.step()  # an accumulation micro-step: DeepSpeed steps only at the boundary
            total += micro_loss.detach()
        return total

    @torch.no_grad()
    def eval_batch(self, batch: dict) -> LossSums:
        total, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for x, y, pos in micro_batches(batch, self.n_micro, self.device, self.document_masking):
            sums = self.loss.sums(self.engine.module.output, self._output(x, pos), y)
            total += sums.loss
            correct += sums.correct
        return LossSums(total, correct)

    @torch.no_grad()
    def score_batch(self, batch: dict) -> torch.Tensor:
        rows = []
        for x, y, pos in micro_batches(batch, self.n_micro, self.device, self.document_masking):
            out = self._output(x, pos)
            rows += [row_sums(self.loss, self.engine.module.output, out[r:r + 1], y[r:r + 1]) for r in range(len(x))]
        return torch.stack(rows)

    def zero_grad(self) -> None:
        pass  # engine.step clears the gradients at the boundary

    def optim_step(self, lr: float, verdict=None):
        """The boundary step of the accumulation; clipping happens inside engine.step (gradient_clipping).
        The engine clips and steps inside one call, so the verdict comes after the update: DeepSpeed
        runs take only the health policies stop and log (megacore/config/health.py); a stopped run saves
        nothing after the bad step."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if not isinstance(norm, torch.Tensor):  # (ZeRO keeps it as a float: DeepSpeed synced it already)
            norm = torch.tensor(float(norm) if norm is not None else 0.0, device=self.device)
        return norm, verdict(norm) if verdict is not None else None

    def save(self, step: int, meta: CheckpointMeta) -> Path | None:
        return self.checkpointer.save(step, self.parts, self.optimizers, meta)

    def load(self, path: Path) -> CheckpointMeta:
        return self.checkpointer.load(path, self.parts, self.optimizers)
