"""The train module: what the training loop and the evaluator drive, whatever the backend.

A train module owns this rank's parallelized model parts, the loss (megacore/loss.py), the optimizer and
the checkpointer of its backend; the Trainer (megacore/train/trainer.py) owns the loop, its timing and
everything around the step. Two implementations: megacore/train/torch_module.py (FSDP2/HSDP, tensor,
pipeline parallelism) and megacore/train/deepspeed_module.py (DeepSpeed ZeRO). Everything is fixed at
construction; no call leaves state behind for the next one to read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from megacore.checkpoint.dcp import Checkpointer
from megacore.checkpoint.meta import CheckpointMeta
from megacore.config import Config
from megacore.distributed import DistEnv
from megacore.loss import LossSums
from megacore.parallel.layout import Layout


class TrainModule(Protocol):
    """Both backends' interface. Nothing here reads a value back to the host: losses, gradient norms and
    verdicts stay device tensors (the trainer reads them at logging steps)."""

    parts: list[nn.Module]  # this rank's model parts (pipeline stages; one part otherwise)
    optimizers: object  # holds `.optimizers`, the torch optimizers whose state this rank keeps
    checkpointer: Checkpointer  # its timing (should_save, poll, close) is the loop's; its state, save/load's
    device: torch.device
    dp_rank: int
    dp_size: int
    grad_average_size: int  # ranks the data-parallel gradient reduction averages over (dp_size x cp)
    reports_loss: bool  # this rank contributes its loss to the global sum (one rank per data-parallel slice)
    counts_tokens: bool  # this rank contributes its batch's target count
    routing: dict[str, torch.Tensor]  # the last step's MoE routing metrics, global (empty: a dense model)

    def train(self, mode: bool = True) -> None: ...

    def train_batch(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Backward of sum(token losses) * scale over this rank's batch (its micro-batches, or the pipeline
        schedule); returns the unscaled summed loss (0 on ranks that hold no loss)."""

    def eval_batch(self, batch: dict[str, torch.Tensor]) -> LossSums:
        """Summed token loss and correct predictions of this rank's batch, without gradients."""

    def score_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(rows, 2): each row's summed token loss and correct predictions, without gradients (downstream
        tasks: one request per row); zeros on ranks that hold no loss."""

    def zero_grad(self) -> None: ...

    def optim_step(self, lr: float, verdict=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clip, ask `verdict(grad_norm)` (run health) whether to apply the step, and apply it at learning
        rate `lr` unless it says skip; returns (gradient norm before clipping, the verdict or None)."""

    def save(self, step: int, meta: CheckpointMeta) -> Path | None:
        """This rank's state (weights, optimizer, random streams) and `meta` as checkpoint `step`."""

    def load(self, path: Path) -> CheckpointMeta:
        """The state of checkpoint `path`; returns its metadata."""


def build_train_module(cfg: Config, layout: Layout, env: DistEnv, init_from: str | None) -> TrainModule:
    """This run's train module on this rank, its weights initialised from cfg.train.seed, or loaded from
    `init_from` (train.init_from when the run does not resume; None otherwise)."""
    if layout.backend == "deepspeed":
        from megacore.train.deepspeed_module import build_deepspeed_module

        return build_deepspeed_module(cfg, layout, env, init_from)
    from megacore.train.torch_module import build_torch_module

    return build_torch_module(cfg, layout, env, init_from)
