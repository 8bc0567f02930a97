"""Applying parallelism to a model from the outside, on one device mesh pp x dp_replicate x dp_shard x tp.

Order (as in torchtitan): pipeline split -> float8 -> tensor parallel -> activation checkpointing ->
compile -> FSDP/HSDP -> materialise. The model arrives on the meta device and all of this happens there; only
then does each rank allocate and initialise the shards it holds (megacore/parallel/materialize.py),
with an initialisation that gives the same weights on every layout.

`ParallelModel` is what the training loop sees: the local model parts, and forward/backward and
evaluation over a rank's micro-batches, through the pipeline schedule when pp > 1. The device, the
micro-batch count and the autocast policy are fixed at construction.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from megacore.config import Config
from megacore.model.llama import Llama
from megacore.parallel.activation_checkpoint import apply_activation_checkpointing
from megacore.parallel.fsdp import apply_fsdp
from megacore.parallel.layout import Layout
from megacore.parallel.materialize import materialize
from megacore.parallel.pipeline import build_schedule, split_into_stages
from megacore.parallel.tensor_parallel import apply_tensor_parallel
from megacore.train.loss import correct_count, loss_sum


def autocast_policy(cfg: Config, layout: Layout, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where nothing else casts: FSDP's mixed-precision policy casts when dp > 1, and
    DeepSpeed's bf16 engine casts itself; fp32 runs need nothing."""
    if cfg.train.mixed_precision == "bf16" and layout.dp_size == 1 and layout.backend == "torch":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_batches(batch: dict, n_micro: int, device, document_masking: bool) -> list[tuple]:
    """(inputs, labels, position_ids or None) of each micro-batch, on the device (a no-op for a batch
    already there: the trainer's batches arrive one step ahead, megacore/train/data.py)."""
    inputs, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    positions = batch["position_ids"].to(device).chunk(n_micro) if document_masking else [None] * n_micro
    return list(zip(inputs.chunk(n_micro), labels.chunk(n_micro), positions))


class ParallelModel:
    """Forward/backward and evaluation over a rank's micro-batches. Losses stay on the device: nothing
    here reads a value back to the host (the trainer reads them at logging steps).

    The loss: without tensor parallelism the output head computes it a chunk of tokens at a time
    (OutputHead, megacore/model/loss.py); with it, the head's logits stay sharded over the vocabulary
    and cross-entropy runs on the shards (torch's loss_parallel), never gathering full logits."""

    def __init__(self, parts: list[nn.Module], layout: Layout, rank: int, device: torch.device,
                 amp: contextlib.AbstractContextManager | None = None, document_masking: bool = False, schedule=None):
        self.parts, self.layout, self.schedule = parts, layout, schedule
        self.device, self.n_micro = device, layout.n_micro
        self.amp = amp if amp is not None else contextlib.nullcontext()
        self.document_masking = document_masking
        coords = layout.coordinates(rank)
        self.tp_rank, self.pp_rank = coords["tp"], coords["pp"]
        self.dp_rank, self.dp_size = layout.dp_rank(rank), layout.dp_size
        self.has_first = any(p.tok_embeddings is not None for p in parts)
        self.has_last = any(p.output is not None for p in parts)
        self.loss_parallel = layout.tp > 1
        # The loss from full fp32 logits (the path before the chunked head): bench/gpu.py's reference.
        self.full_logits_loss = False
        self._scale = 1.0  # the pipeline loss function's gradient scale for the current step
        self._correct = torch.zeros((), device=device)  # counted by the pipeline loss function in evaluation

    @property
    def reports_loss(self) -> bool:
        """One rank per data-parallel slice contributes the loss to the global sum."""
        return self.has_last and self.tp_rank == 0

    @property
    def counts_tokens(self) -> bool:
        return self.pp_rank == 0 and self.tp_rank == 0

    def train(self, mode: bool = True) -> None:
        for p in self.parts:
            p.train(mode)

    def _context(self):
        """The amp policy, and loss_parallel under tensor parallelism (forward and backward both)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.amp)
        if self.loss_parallel:
            stack.enter_context(loss_parallel())
        return stack

    def _loss(self, model: nn.Module, x, y, pos) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, correct predictions) of one micro-batch."""
        if not (self.loss_parallel or self.full_logits_loss):
            return model(x, pos, labels=y)
        return _loss_from_logits(model(x, pos), y)

    def _pipeline_loss(self, output, target: torch.Tensor) -> torch.Tensor:
        # The last stage's OutputHead computed (loss, correct) itself, or (TP) returned sharded logits.
        loss, correct = output if isinstance(output, tuple) else _loss_from_logits(output, target)
        if not torch.is_grad_enabled():
            self._correct += correct
        return loss * self._scale

    def _run_pipeline(self, run, batch: dict) -> torch.Tensor:
        """One schedule step/eval; returns this rank's unscaled loss sum (0 off the last stage)."""
        inputs, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
        losses: list[torch.Tensor] = []
        target = labels if self.has_last else None
        # Every stage gets the micro-batch's position ids (document masking) and labels (the last stage's
        # head computes the loss from them; other stages ignore them).
        kwargs = {"position_ids": batch["position_ids"].to(self.device)} if self.document_masking else {}
        if not self.loss_parallel:
            kwargs["labels"] = labels
        with self._context():
            if self.has_first:
                run(inputs, target=target, losses=losses, return_outputs=False, **kwargs)
            else:
                run(target=target, losses=losses, return_outputs=False, **kwargs)
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([l.detach().float() for l in losses]).sum() / self._scale

    def forward_backward(self, batch: dict, scale: float) -> torch.Tensor:
        """Backward of sum(token losses) * scale over this rank's batch; returns its unscaled loss sum."""
        self._scale = scale
        if self.schedule is not None:
            return self._run_pipeline(self.schedule.step, batch)
        model, total = self.parts[0], torch.zeros((), device=self.device)
        for i, (x, y, pos) in enumerate(micro_batches(batch, self.n_micro, self.device, self.document_masking)):
            if isinstance(model, FSDPModule) and not self.layout.fsdp_lean:
                # Reduce-scatter gradients once, on the last micro-batch (lean: on every one, so that
                # only sharded gradients accumulate).
                model.set_requires_gradient_sync(i == self.n_micro - 1)
            with self._context():
                micro_loss, _ = self._loss(model, x, y, pos)
                (micro_loss * scale).backward()
            total += micro_loss.detach()
        return total

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's summed token loss and count of correctly predicted targets, without gradients."""
        self._scale, self._correct = 1.0, torch.zeros((), device=self.device)
        if self.schedule is not None:
            return self._run_pipeline(self.schedule.eval, batch), self._correct
        total, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for x, y, pos in micro_batches(batch, self.n_micro, self.device, self.document_masking):
            with self._context():
                micro_loss, micro_correct = self._loss(self.parts[0], x, y, pos)
            total += micro_loss
            correct += micro_correct
        return total, correct


def _loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, correct predictions) from logits: vocabulary-sharded under TP (loss_parallel; the
    accuracy count, in evaluation only, gathers them), or full (bench/gpu.py's reference)."""
    loss = loss_sum(logits, labels)
    loss = loss.to_local() if isinstance(loss, DTensor) else loss
    if torch.is_grad_enabled():
        return loss, torch.zeros((), device=labels.device)
    full = logits.full_tensor() if isinstance(logits, DTensor) else logits
    return loss, correct_count(full, labels)


def apply_parallelism(model: Llama, cfg: Config, layout: Layout, mesh: DeviceMesh) -> list[tuple[int, Llama]]:
    """[(stage index, part)] of this rank with parallelism applied, all still on the meta device.
    `model` (on meta) is consumed; with pp > 1 only its config is used."""
    par = cfg.parallel
    compile_ = par.compile is True  # ("auto" is resolved for the device by the trainer; elsewhere: eager)
    if layout.pp > 1:
        stages = split_into_stages(model.cfg, mesh["pp"].get_local_rank(), layout.pp, layout.stages_per_rank)
    else:
        stages = [(0, model)]
    for _, part in stages:
        if part.output is not None:
            part.output.compile_loss = compile_
        if cfg.train.float8:
            from megacore.parallel.float8 import apply_float8

            apply_float8(part, fsdp=layout.dp_size > 1)
        if layout.tp > 1:
            apply_tensor_parallel(part, mesh["tp"])
        apply_activation_checkpointing(part, par.activation_checkpointing)
        if compile_:
            for block in part.layers.values():
                block.compile()
        if layout.dp_size > 1:
            dp_mesh = mesh["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else mesh["dp_shard"]
            apply_fsdp(part, dp_mesh, cfg.train.mixed_precision == "bf16", pipelined=layout.pp > 1,
                       lean=layout.fsdp_lean)
    return stages


def parallelize(model: Llama, cfg: Config, layout: Layout, mesh: DeviceMesh, rank: int,
                device: torch.device) -> ParallelModel:
    """Parallelism applied to `model` (on the meta device, consumed), then this rank's shards allocated
    on `device` and initialised from cfg.train.seed. Loading weights (init_from, resume) comes after,
    into the shards."""
    stages = apply_parallelism(model, cfg, layout, mesh)
    del model
    parts = [part for _, part in stages]
    materialize(parts, device, cfg.train.seed)
    pm = ParallelModel(parts, layout, rank, device, autocast_policy(cfg, layout, device),
                       document_masking=cfg.model.document_masking)
    if layout.pp > 1:
        pm.schedule = build_schedule(stages, layout.n_stages, layout.pp_schedule, layout.n_micro, mesh["pp"], device,
                                     pm._pipeline_loss, fsdp_lean=layout.fsdp_lean)
    return pm
