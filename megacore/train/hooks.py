"""Step hooks: the one way to add work to the training loop without editing it.

A hook is any object with these methods (subclass `Hook` and override what you need). The Trainer
calls them in list order, on every rank, at four points of each step:

    before_step(trainer, step)           before the step's batch is read
    after_step(trainer, step, result)    after the optimizer step, gradients still held; result: StepResult
    after_eval(trainer, step, results)   after the evaluation sets ran; results: {"val": {...}, "val_x": {...}}
    after_save(trainer, step, path)      after the checkpoint of `step` was committed (path), or staged
                                         for a background write (None)

Hooks see the whole trainer (`trainer.module`, the train module: its `parts` and `optimizers`; `trainer.metrics`,
`trainer.env`, ...).
A hook that runs a collective must run it on every rank at the same step, or the group hangs. Time a
hook spends inside `after_eval` / `after_save` is outside the throughput window; inside `before_step` /
`after_step` it counts as training time. Built in: the profiler (megacore/monitor/profiling.py) and the
memory report (megacore/monitor/memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step produced, the same on every rank. The loss and gradient norm are kept
    as device tensors (so the step never waits on the device); reading `loss` or `grad_norm` copies
    them to the host, which the trainer does at logging steps only."""

    step: int
    lr: float
    loss_sum: torch.Tensor | float  # summed token loss over the global batch
    grad_norm_value: torch.Tensor | float  # before clipping
    tokens: int  # target tokens in the global batch
    stop_votes: int  # ranks asking to stop (signal or STOP file)
    verdict: torch.Tensor | None = None  # run health's verdict of the step (megacore/health/checks.py)
    routing: dict[str, torch.Tensor] = field(default_factory=dict)  # MoE routing metrics (device tensors)

    @property
    def loss(self) -> float:
        """Mean token loss over the global batch (nan for a batch without targets)."""
        return float(self.loss_sum) / self.tokens if self.tokens else float("nan")

    @property
    def grad_norm(self) -> float:
        return float(self.grad_norm_value)


class Hook:
    def before_step(self, trainer, step: int) -> None:
        pass

    def after_step(self, trainer, step: int, result: StepResult) -> None:
        pass

    def after_eval(self, trainer, step: int, results: dict[str, dict]) -> None:
        pass

    def after_save(self, trainer, step: int, path: Path | None) -> None:
        pass
