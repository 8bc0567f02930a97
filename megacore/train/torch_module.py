"""The torch backend's train module: FSDP2/HSDP, tensor and pipeline parallelism (megacore/parallel), the
loss (megacore/loss.py), one fused AdamW per model part and DCP checkpoints.

Micro-batches run one after another through the one model part, or (pp > 1) through the pipeline
schedule, whose loss function is this module's loss, fixed at construction. With tensor parallelism
the head's logits stay sharded over the vocabulary and the loss runs on the shards (loss_parallel),
forward and backward both. Under context parallelism each micro-batch is first cut to this rank's
share of every sequence (megacore/parallel/context_parallel.py): inputs, labels and position ids alike;
the loss is this rank's tokens' sum, and FSDP's average over dp_shard x cp makes the gradient whole.
A mixture of experts adds its auxiliary loss to each micro-batch's objective and moves its balancing
bias after each optimizer step (megacore/parallel/load_balance.py); `routing` holds the step's metrics.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.parallel import loss_parallel

from megacore.checkpoint.dcp import Checkpointer
from megacore.checkpoint.meta import CheckpointMeta
from megacore.checkpoint.weights import init_source, load_weights_into_shards
from megacore.config import Config
from megacore.distributed import DistEnv, on_every_rank
from megacore.health.checks import VERDICT_SKIP
from megacore.loss import LanguageModelLoss, LossSums, row_sums
from megacore.model import Llama
from megacore.parallel.context_parallel import shard_sequence
from megacore.parallel.layout import Layout
from megacore.parallel.load_balance import after_step, auxiliary_loss, gather_over_stages, load_metrics, moe_layers_of
from megacore.parallel.parallelize import autocast_policy, parallelize
from megacore.parallel.pipeline import build_schedule
from megacore.train.data import micro_batches
from megacore.train.optim import Optimizers


@dataclass(frozen=True)
class Balancing:
    """A mixture of experts' load balancing in training (model.moe_*), over `mesh`: the ranks that hold
    different tokens of the same layers (None: one rank)."""

    aux_coef: float
    bias_rate: float
    mesh: object = None


def build_torch_module(cfg: Config, layout: Layout, env: DistEnv, init_from: str | None) -> TorchTrainModule:
    """Built on the meta device (no memory), parallelized, then each rank allocates and initialises only
    its shards; `init_from` weights are read into the shards (each rank its slices)."""
    loss = LanguageModelLoss.for_run(layout.tp, compiled=cfg.parallel.compile is True)
    with torch.device("meta"):
        model = Llama(cfg.model)
    mesh = layout.build_mesh(env.device.type)
    par = parallelize(model, cfg, layout, mesh, env.device, loss)
    if init_from:
        source = init_source(cfg, env)  # (checked and verified once; fetched once per node)
        on_every_rank(lambda: load_weights_into_shards(par.parts, source), env)
    optimizers = Optimizers(par.parts, cfg.optim, mesh["pp"].get_group() if layout.pp > 1 else None,
                            float8_fsdp=cfg.train.float8 and layout.fsdp_size > 1)
    return TorchTrainModule(par.stages, layout, env.rank, env.device, loss, optimizers,
                            Checkpointer(cfg.train.run_dir, cfg.checkpoint, env.rank),
                            autocast_policy(cfg, layout, env.device), cfg.model.document_masking,
                            pp_mesh=mesh["pp"] if layout.pp > 1 else None,
                            balancing=Balancing(cfg.model.moe_aux_loss_coef, cfg.model.moe_bias_update_rate,
                                                layout.fsdp_mesh(mesh) if layout.fsdp_size > 1 else None)
                            if cfg.model.moe else None)


class TorchTrainModule:
    """This rank's parts, their loss, optimizers and checkpointer (megacore/train/module.py's protocol).
    Without optimizers and checkpointer (None) it evaluates only (`megacore eval`)."""

    def __init__(self, stages: list[tuple[int, nn.Module]], layout: Layout, rank: int, device: torch.device,
                 loss: LanguageModelLoss, optimizers: Optimizers | None = None, checkpointer: Checkpointer | None = None,
                 amp: contextlib.AbstractContextManager | None = None, document_masking: bool = False,
                 pp_mesh=None, balancing: Balancing | None = None):
        self.parts = [part for _, part in stages]
        self.layout, self.device, self.n_micro, self.loss = layout, device, layout.n_micro, loss
        self.optimizers, self.checkpointer = optimizers, checkpointer
        self.amp = amp if amp is not None else contextlib.nullcontext()
        self.document_masking, self.balancing = document_masking, balancing
        self._per_row = False  # (score_batch under pipelining: the loss function's output per row)
        self.routing: dict[str, torch.Tensor] = {}  # the last step's MoE routing metrics (device tensors)
        self.moe_layers = moe_layers_of(self.parts) if balancing is not None else []  # (layer index, MoE)
        coords = layout.coordinates(rank)
        self.tp_rank, self.pp_rank, self.cp_rank = coords["tp"], coords["pp"], coords["cp"]
        self.dp_rank, self.dp_size = layout.dp_rank(rank), layout.dp_size
        self.grad_average_size = layout.fsdp_size
        self.has_first = any(p.tok_embeddings is not None for p in self.parts)
        self.head = next((p.output for p in self.parts if p.output is not None), None)
        # One rank per data-parallel slice and share of the sequence (cp ranks hold different tokens).
        self.reports_loss = self.head is not None and self.tp_rank == 0
        self.counts_tokens = self.pp_rank == 0 and self.tp_rank == 0 and self.cp_rank == 0
        self.pp_group = pp_mesh.get_group() if pp_mesh is not None else None
        self.schedule = (build_schedule(stages, layout.n_stages, layout.pp_schedule, layout.n_micro, pp_mesh,
                                        device, self._pipeline_loss, fsdp_lean=layout.fsdp_lean)
                         if layout.pp > 1 else None)

    def train(self, mode: bool = True) -> None:
        for p in self.parts:
            p.train(mode)

    def _context(self):
        """The amp policy, and loss_parallel under tensor parallelism (forward and backward both)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.amp)
        if self.layout.tp > 1:
            stack.enter_context(loss_parallel())
        return stack

    def _output(self, part: nn.Module, x, pos) -> torch.Tensor:
        return part(x, pos, return_hidden=self.loss.wants_hidden)

    def _micro_batches(self, batch: dict, n_micro: int | None = None) -> list[tuple]:
        """(inputs, labels, position ids or None) of each micro-batch on this rank: under context parallelism,
        this rank's share of each sequence, with the real position ids (per document, or 0..T-1)."""
        micro = micro_batches(batch, n_micro or self.n_micro, self.device, self.document_masking)
        if self.layout.cp == 1:
            return micro
        return [self._cp_share(x, y, pos) for x, y, pos in micro]

    def _cp_share(self, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor | None) -> tuple:
        cp, r = self.layout.cp, self.cp_rank
        if pos is None:
            pos = torch.arange(x.shape[1], device=x.device).expand_as(x)
        return shard_sequence(x, cp, r), shard_sequence(y, cp, r), shard_sequence(pos, cp, r)

    def train_batch(self, batch: dict, scale: float) -> torch.Tensor:
        if self.schedule is not None:
            return self._train_pipeline(batch, scale)
        model, total = self.parts[0], torch.zeros((), device=self.device)
        aux = self._begin_routing()
        for i, (x, y, pos) in enumerate(self._micro_batches(batch)):
            if isinstance(model, FSDPModule) and not self.layout.fsdp_lean:
                # Reduce-scatter gradients once, on the last micro-batch (lean: on every one, so that
                # only sharded gradients accumulate).
                model.set_requires_gradient_sync(i == self.n_micro - 1)
            with self._context():
                micro_loss = self.loss(model.output, self._output(model, x, pos), y)
                objective = micro_loss * scale
                if aux is not None:
                    # The step's auxiliary term is the mean over micro-batches; FSDP averages the ranks'
                    # gradients, so each rank's share is scaled by their number as the token loss is.
                    share, value = auxiliary_loss(self.moe_layers, self.balancing.mesh)
                    objective = objective + share * (self.balancing.aux_coef * self.grad_average_size / self.n_micro)
                    aux += value.detach() / self.n_micro
                objective.backward()
            total += micro_loss.detach()
        return total

    def _begin_routing(self) -> torch.Tensor | None:
        """A new step's metrics; the accumulator of its auxiliary loss when there is one. (The expert counts
        start at zero: the last optimizer step reset them.)"""
        if self.balancing is None:
            return None
        self.routing = {}
        if self.balancing.aux_coef > 0:
            self.routing["moe/aux_loss"] = torch.zeros((), device=self.device)
            return self.routing["moe/aux_loss"]
        return None

    @torch.no_grad()
    def eval_batch(self, batch: dict) -> LossSums:
        if self.schedule is not None:
            sums = self._run_pipeline(self.schedule.eval, batch)
            return LossSums(sums[0], sums[1])
        total, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for x, y, pos in self._micro_batches(batch):
            with self._context():
                sums = self.loss.sums(self.parts[0].output, self._output(self.parts[0], x, pos), y)
            total += sums.loss
            correct += sums.correct
        return LossSums(total, correct)

    @torch.no_grad()
    def score_batch(self, batch: dict) -> torch.Tensor:
        """(rows, 2): each row's summed token loss and correct predictions (downstream tasks score one
        request per row: megacore/eval/tasks.py); zeros on ranks that hold no loss."""
        if self.schedule is not None:
            self._per_row = True
            try:
                return self._run_pipeline(self.schedule.eval, batch, rows=len(batch["input_ids"]))
            finally:
                self._per_row = False
        rows = []
        for x, y, pos in self._micro_batches(batch):
            with self._context():
                out = self._output(self.parts[0], x, pos)
                rows += [row_sums(self.loss, self.parts[0].output, out[r:r + 1], y[r:r + 1]) for r in range(len(x))]
        return torch.stack(rows)

    def _pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function, on the last stage: the summed loss in training; in evaluation
        (no gradients) the loss and the correct count, stacked, as the schedule keeps one tensor each (per
        row when scoring: score_batch)."""
        if torch.is_grad_enabled():
            return self.loss(self.head, output, target)
        if self._per_row:
            return torch.stack([row_sums(self.loss, self.head, output[r:r + 1], target[r:r + 1])
                                for r in range(len(output))])
        sums = self.loss.sums(self.head, output, target)
        return torch.stack([sums.loss.float(), sums.correct.float()])

    def _train_pipeline(self, batch: dict, scale: float) -> torch.Tensor:
        """One schedule step on the unscaled loss; the gradients are then scaled (the schedule's loss
        function is fixed at construction, the scale changes with each step's token count)."""
        self._begin_routing()  # (no auxiliary loss under pp: megacore/preflight.py)
        total = self._run_pipeline(self.schedule.step, batch)
        grads = [p.grad for part in self.parts for p in part.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
        return total

    def _run_pipeline(self, run, batch: dict, rows: int = 0) -> torch.Tensor:
        """One schedule step or eval; the sum of the last stage's loss-function outputs (0 elsewhere), or
        with `rows` (scoring) their rows in order."""
        ((inputs, labels, positions),) = self._micro_batches(batch, n_micro=1)  # (the schedule splits it)
        losses: list[torch.Tensor] = []
        target = labels if self.head is not None else None
        # Every stage gets the micro-batch's position ids (document masking, context parallelism) and
        # whether to stop at the hidden states (the last stage's loss applies the head).
        kwargs = {"position_ids": positions} if positions is not None else {}
        kwargs["return_hidden"] = self.loss.wants_hidden
        with self._context():
            if self.has_first:
                run(inputs, target=target, losses=losses, return_outputs=False, **kwargs)
            else:
                run(target=target, losses=losses, return_outputs=False, **kwargs)
        if rows:
            return torch.cat(losses) if losses else torch.zeros(rows, 2, device=self.device)
        if not losses:
            return torch.zeros(() if torch.is_grad_enabled() else (2,), device=self.device)
        return torch.stack([loss.detach().float() for loss in losses]).sum(0)

    def zero_grad(self) -> None:
        self.optimizers.zero_grad()

    def optim_step(self, lr: float, verdict=None):
        self.optimizers.set_lr(lr)
        norm, judged = self.optimizers.step(verdict)
        if self.balancing is not None:
            skip = judged[VERDICT_SKIP].float() if judged is not None else None
            table = after_step(self.moe_layers, self.balancing.mesh, self.balancing.bias_rate, skip)
            ids = [i for i, _ in self.moe_layers]
            if self.pp_group is not None:
                cfg = self.parts[0].cfg
                every = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
                ids, table = every, gather_over_stages(ids, table, every, self.pp_group, self.device)
            self.routing.update(load_metrics(ids, table))
        return norm, judged

    def save(self, step: int, meta: CheckpointMeta) -> Path | None:
        return self.checkpointer.save(step, self.parts, self.optimizers, meta)

    def load(self, path: Path) -> CheckpointMeta:
        return self.checkpointer.load(path, self.parts, self.optimizers)
