"""DeepSpeed ZeRO, the alternative to the torch backend: the same Llama, loader, loop and checkpoints.

`init_deepspeed` returns what the training loop uses with either backend: a model with
forward_backward / eval_loss (as ParallelModel) and an optimizer with set_lr / step / zero_grad (as
Optimizers). ZeRO stage, offload, bf16, gradient accumulation and clipping come from our config;
DeepSpeed's own JSON config is derived, never written by hand. Its checkpoints are written by
megacore/checkpoint/deepspeed.py, around the engine this module builds (`DeepSpeedModel.engine`).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from megacore.config import Config
from megacore.model.init import normal_values
from megacore.model.llama import Llama
from megacore.parallel.layout import Layout
from megacore.parallel.parallelize import micro_batches
from megacore.train.optim import param_groups


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


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    kw = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    groups = param_groups(model, cfg.optim.weight_decay)
    if cfg.parallel.offload_optimizer:
        # ZeRO-Offload steps on the CPU with DeepSpeed's vectorised Adam (a C++ op, built on first use).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=True, **kw)  # as megacore.train.optim


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
    rank = dist.get_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            local, std = p.ds_tensor.view(-1), model.init_std(name)
            start = rank * local.numel()
            stop = min(p.ds_numel, start + local.numel())
            if stop <= start:
                continue
            if std is None or std == 0:  # norm weights: ones; biases: zeros
                local[:stop - start].fill_(1.0 if std is None else 0.0)
            else:
                local[:stop - start].copy_(normal_values(cfg.train.seed, name, p.ds_numel, start, stop, std,
                                                         local.device))
    return model


def init_deepspeed(model: nn.Module, cfg: Config, layout: Layout, device: torch.device):
    """(model, optimizer) for the training loop, with `model` wrapped by a ZeRO engine."""
    deepspeed = _start_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=_optimizer(model, cfg),
                                           config=deepspeed_config(cfg, layout.n_micro), dist_init_required=False)
    return DeepSpeedModel(engine, layout.n_micro, device, cfg.model.document_masking), DeepSpeedOptimizer(engine)


class DeepSpeedModel:
    """The engine behind ParallelModel's interface; every rank is a data-parallel rank."""

    reports_loss = counts_tokens = True

    def __init__(self, engine, n_micro: int, device: torch.device, document_masking: bool):
        self.engine, self.n_micro, self.device, self.document_masking = engine, n_micro, device, document_masking
        self.parts = [engine.module]
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def forward_backward(self, batch: dict, scale: float) -> torch.Tensor:
        """Backward of sum(token losses) * scale, as the torch backend; DeepSpeed averages over ranks
        like FSDP, and its own 1/accumulation scaling is turned off because `scale` already normalises."""
        total = torch.zeros((), device=self.device)
        for i, (x, y, pos) in enumerate(micro_batches(batch, self.n_micro, self.device, self.document_masking)):
            micro_loss, _ = self.engine(x, pos, labels=y)  # the head's chunked loss (OutputHead)
            self.engine.backward(micro_loss * scale, scale_wrt_gas=False)
            if i < self.n_micro - 1:
                self.engine.step()  # an accumulation micro-step: DeepSpeed steps only at the boundary
            total += micro_loss.detach()
        return total

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        total, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for x, y, pos in micro_batches(batch, self.n_micro, self.device, self.document_masking):
            micro_loss, micro_correct = self.engine(x, pos, labels=y)
            total += micro_loss
            correct += micro_correct
        return total, correct


class DeepSpeedOptimizer:
    """set_lr / step / zero_grad over the engine; clipping happens inside engine.step (gradient_clipping)."""

    def __init__(self, engine):
        self.engine = engine
        # The wrapped optimizer, whose state holds this rank's partition (for the memory report).
        self.optimizers = [engine.optimizer.optimizer]

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def step(self, verdict=None):
        """The boundary step of the accumulation; returns (the global gradient norm before clipping, the
        run-health verdict). The engine clips and steps inside one call, so the verdict comes after the
        update: DeepSpeed runs take only the health policies stop and log (megacore/config/health.py);
        a stopped run saves nothing after the bad step."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(float(norm) if norm is not None else 0.0, device=self.engine.device)
        return norm, verdict(norm) if verdict is not None else None

    def zero_grad(self) -> None:
        pass  # engine.step clears the gradients at the boundary
