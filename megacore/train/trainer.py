"""The training loop: data -> model -> parallelize -> train step -> eval / checkpoint / metrics.

Launched once per rank (by torchrun, or directly for one process). Loss normalisation: each step's
loss is the sum of token losses over the whole global batch divided by its number of target tokens,
so any data-parallel size and any gradient-accumulation split give the same gradients.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.distributed.fsdp import FSDPModule

from data_pipeline.loader import PackedLoader, TokenStore
from data_pipeline.shards import read_manifest
from megacore.checkpoint import Checkpointer, latest_checkpoint, resolve_checkpoint
from megacore.config import Config, ConfigError
from megacore.distributed import all_reduce_sum, init_distributed, shutdown
from megacore.evaluate import evaluate
from megacore.loss import IGNORE_INDEX, loss_sum
from megacore.metrics import MetricsLogger
from megacore.model import Llama, flops_per_token, num_params
from megacore.parallel import build_mesh, parallelize
from megacore.run_dir import resolve_vocab_size, write_run_dir
from megacore.train.optim import build_optimizer, clip_grad_norm, lr_at, set_lr


def train(cfg: Config, resume: str = "none") -> dict:
    env = init_distributed(cfg.train.device)
    try:
        return _train(cfg, resume, env)
    finally:
        shutdown()


def _train(cfg: Config, resume: str, env) -> dict:
    accum_steps = cfg.check_world(env.world_size)
    resolve_vocab_size(cfg)
    run_dir = cfg.train.run_dir
    if env.is_main:
        write_run_dir(cfg)
    torch.distributed.barrier()

    torch.manual_seed(cfg.train.seed)
    with torch.device(env.device):
        model = Llama(cfg.model)
    mesh = build_mesh(cfg, env)
    model = parallelize(model, cfg, mesh)
    optimizer = build_optimizer(model, cfg.optim)
    dp_rank, dp_size = mesh.get_local_rank(), mesh.size()

    seq_len, gbs = cfg.data.seq_len, cfg.train.global_batch_size
    stores, weights = train_stores(cfg)
    train_loader = PackedLoader(stores, seq_len, gbs, dp_rank, dp_size, cfg.train.seed, weights=weights,
                                num_workers=cfg.data.num_workers)
    val_store = TokenStore(cfg.data.dir, "val")

    checkpointer = Checkpointer(run_dir, cfg.checkpoint, env.is_main)
    step = 0
    ckpt = checkpoint_to_resume(run_dir, resume)
    if ckpt is not None:
        meta = checkpointer.load(ckpt, model, optimizer)
        train_loader.load_state_dict(meta["loader"])
        step = meta["step"]
        if env.is_main:
            print(f"resumed from {ckpt} at step {step}", flush=True)

    amp = (torch.autocast(env.device.type, dtype=torch.bfloat16)
           if cfg.train.mixed_precision == "bf16" and dp_size == 1 else contextlib.nullcontext())
    metrics = MetricsLogger(run_dir, env.is_main, cfg.train.steps)
    flops_token = flops_per_token(cfg.model, seq_len)
    if env.is_main and step == 0:
        print(f"model: {num_params(model) / 1e6:.2f}M parameters, {flops_token / 1e6:.1f} MFLOP/token; "
              f"{env.world_size} rank(s), global batch {gbs} x {seq_len} tokens, "
              f"{accum_steps} accumulation step(s)", flush=True)

    last_stop = cfg.train.stop_after or cfg.train.steps
    result: dict = {}
    window_start, window_tokens = time.perf_counter(), 0
    model.train()
    while step < last_stop:
        step += 1
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        set_lr(optimizer, lr)
        loss, tokens = _train_step(model, train_loader.next_batch(), accum_steps, dp_size, env.device, amp)
        grad_norm = clip_grad_norm(model, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += tokens

        if step % cfg.logging.log_every == 0 or step == last_stop:
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed
            result = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                      "tflops": tps * flops_token / 1e12, "epoch": train_loader.epoch}
            metrics.log(step, result)
            window_start, window_tokens = time.perf_counter(), 0

        if step % cfg.train.eval_every == 0 or step == last_stop:
            val_loader = PackedLoader(val_store, seq_len, gbs, dp_rank, dp_size, shuffle=False)
            result["val"] = evaluate(model, val_loader, cfg.train.eval_batches, env.device, amp,
                                     cfg.train.micro_batch_size)
            metrics.log(step, result["val"], kind="val")

        if step % cfg.checkpoint.every == 0 or step == last_stop:
            meta = {"loader": train_loader.state_dict(), "config": cfg.to_dict(), "world_size": env.world_size}
            path = checkpointer.save(step, model, optimizer, meta)
            if env.is_main:
                print(f"saved checkpoint {path}", flush=True)
            window_start = time.perf_counter()  # keep checkpoint time out of throughput
    metrics.close()
    train_loader.close()
    return {"step": step, **result}


def train_stores(cfg: Config) -> tuple[list[TokenStore], list[float]]:
    """The training split of `data.dir`, or of each `data.mixture` directory with its weight."""
    mixture = cfg.data.mixture_weights() or [(cfg.data.dir, 1.0)]
    stores = [TokenStore(path, "train") for path, _ in mixture]
    tokenizer = read_manifest(cfg.data.dir)["tokenizer"]["sha256"]
    for store in stores:
        if store.manifest["tokenizer"]["sha256"] != tokenizer:
            raise ConfigError(f"data.mixture: {store.data_dir} was tokenized with another tokenizer than "
                              f"data.dir={cfg.data.dir}")
    return stores, [w for _, w in mixture]


def checkpoint_to_resume(run_dir: str, resume: str):
    """The checkpoint that `--resume` selects, or None to start fresh; raises if that would lose work."""
    if resume == "none":
        existing = latest_checkpoint(run_dir)
        if existing is not None:
            raise FileExistsError(f"{run_dir} already has checkpoints (newest: {existing.name}); pass "
                                  f"--resume auto to continue it, or choose another train.run_dir")
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    return resolve_checkpoint(resume)


def _train_step(model, batch, accum_steps: int, dp_size: int, device, amp) -> tuple[float, int]:
    """Forward/backward over this rank's micro-batches; returns (global mean loss, global target tokens)."""
    inputs, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    local_tokens = int((labels != IGNORE_INDEX).sum())
    global_tokens = int(all_reduce_sum([local_tokens], device)[0])
    # FSDP averages gradients over dp ranks; scaling by dp_size makes the result sum / global_tokens.
    scale = dp_size / global_tokens
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(zip(inputs.chunk(accum_steps), labels.chunk(accum_steps))):
        if isinstance(model, FSDPModule):
            # Reduce-scatter gradients once, on the last micro-batch.
            model.set_requires_gradient_sync(i == accum_steps - 1)
        with amp:
            logits = model(x)
        micro_loss = loss_sum(logits, y)
        (micro_loss * scale).backward()
        total += micro_loss.detach()
    loss = all_reduce_sum([float(total)], device)[0] / global_tokens
    return loss, global_tokens
