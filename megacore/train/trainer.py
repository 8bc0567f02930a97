"""The training loop: data -> model -> parallelize -> train step -> eval / checkpoint / metrics.

Launched once per rank (by torchrun, or directly for one process). Loss normalisation: each step's
loss is the sum of token losses over the whole global batch divided by its number of target tokens,
so any data-parallel size and any gradient-accumulation split give the same gradients.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from data_pipeline.loader import PackedLoader, TokenStore
from data_pipeline.shards import read_manifest
from megacore.checkpoint import (Checkpointer, backend_of, latest_checkpoint, load_model_weights, newest_good_checkpoint,
                                 read_meta, resolve_checkpoint)
from megacore.config import Config, ConfigError
from megacore.distributed import all_reduce_sum, init_distributed, shutdown
from megacore.evaluate import evaluate
from megacore.hf import load_hf_into
from megacore.loss import IGNORE_INDEX
from megacore.metrics import MetricsLogger
from megacore.model import Llama, flops_per_token, num_params
from megacore.parallel import ParallelModel, build_mesh, parallelize
from megacore.profiling import StepProfiler
from megacore.run_dir import resolve_vocab_size, write_run_dir
from megacore.throughput import measure_matmul_tflops, peak_memory_gib, write_memory_report
from megacore.train.optim import Optimizers, lr_at
from megacore.train.preemption import StopRequest
from megacore.wandb_run import WandbRun


def train(cfg: Config, resume: str = "none") -> dict:
    env = init_distributed(cfg.train.device)
    try:
        return _train(cfg, resume, env)
    finally:
        shutdown()


def _train(cfg: Config, resume: str, env) -> dict:
    n_micro = cfg.check_world(env.world_size)
    layout = cfg.parallel.resolve(env.world_size)
    resolve_vocab_size(cfg)
    run_dir = cfg.train.run_dir
    if env.is_main:
        write_run_dir(cfg)
    torch.distributed.barrier()

    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        resume = "auto"  # torchrun restarted the group after a failure: continue where it stopped
    # Rank 0 verifies and chooses the checkpoint to resume; every rank loads the same one.
    choice = [checkpoint_to_resume(run_dir, resume) if env.is_main else None]
    torch.distributed.broadcast_object_list(choice, src=0)
    ckpt = choice[0]

    torch.manual_seed(cfg.train.seed)
    with torch.device(env.device):
        model = Llama(cfg.model)
    if ckpt is None and cfg.train.init_from:
        init_weights_from(model, cfg.train.init_from)
        if env.is_main:
            print(f"initialised weights from {cfg.train.init_from}", flush=True)
    n_params = num_params(model)
    if layout.backend == "deepspeed":
        from megacore.parallel.deepspeed import init_deepspeed

        pm, optimizers, checkpointer = init_deepspeed(model, cfg, n_micro, env.device)
    else:
        mesh = build_mesh(layout, env)
        pm = parallelize(model, cfg, layout, mesh, n_micro, env.device)
        optimizers = Optimizers(pm.parts, cfg.optim, mesh["pp"].get_group() if layout.pp > 1 else None)
        checkpointer = Checkpointer(run_dir, cfg.checkpoint, env.rank)

    seq_len, gbs = cfg.data.seq_len, cfg.train.global_batch_size
    stores, weights = train_stores(cfg)
    train_loader = PackedLoader(stores, seq_len, gbs, pm.dp_rank, pm.dp_size, cfg.train.seed, weights=weights,
                                num_workers=cfg.data.num_workers, document_positions=cfg.model.document_masking)
    val_store = TokenStore(cfg.data.dir, "val")
    eval_sets = [("val", val_store)] + [(f"val_{name}", TokenStore(d, split))
                                        for name, d, split in cfg.train.named_eval_sets()]
    check_tokenizers([store for _, store in eval_sets[1:]], cfg.data.dir, "train.eval_sets")
    best_val, evals_without_gain = float("inf"), 0

    step, meta = 0, {}
    if ckpt is not None:
        meta = checkpointer.load(ckpt, pm.parts, optimizers)
        train_loader.load_state_dict(meta["loader"])
        step = meta["step"]
        if env.is_main:
            print(f"resumed from {ckpt} at step {step}", flush=True)

    # FSDP's mixed-precision policy or DeepSpeed's bf16 engine casts; otherwise autocast does.
    amp = (torch.autocast(env.device.type, dtype=torch.bfloat16)
           if cfg.train.mixed_precision == "bf16" and layout.dp_size == 1 and layout.backend == "torch"
           else contextlib.nullcontext())
    wandb = WandbRun(cfg, run_dir, meta.get("wandb_run_id") if ckpt is not None else None) if env.is_main else None
    metrics = MetricsLogger(run_dir, env.is_main, cfg.train.steps, wandb)
    flops_token = flops_per_token(cfg.model, seq_len)
    peak_tflops = cfg.train.peak_tflops or measure_matmul_tflops(
        env.device, torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float32)
    if env.is_main and step == 0:
        print(f"model: {n_params / 1e6:.2f}M parameters, {flops_token / 1e6:.1f} MFLOP/token; {env.world_size} "
              f"rank(s) as pp {layout.pp} x dp_replicate {layout.dp_replicate} x dp_shard {layout.dp_shard} x "
              f"tp {layout.tp}; global batch {gbs} x {seq_len} tokens in {n_micro} micro-batch(es) per dp rank; "
              f"MFU against {peak_tflops:.3f} TFLOP/s per rank ({torch.get_num_threads()} CPU threads each)", flush=True)
    last_stop, start_step = cfg.train.stop_after or cfg.train.steps, step
    stop_request, preempted, early_stop = StopRequest(run_dir, env.is_main), False, False
    result: dict = {}
    profiler = StepProfiler(run_dir, cfg.logging.profile_start, cfg.logging.profile_steps, env.rank, env.device)
    window_start, window_tokens = time.perf_counter(), 0
    pm.train()
    while step < last_stop:
        step += 1
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        optimizers.set_lr(lr)
        profiler.before_step(step)
        loss, tokens, stop_votes = _train_step(pm, train_loader.next_batch(), n_micro, env.device, amp,
                                               stop_request.requested_here())
        grad_norm = optimizers.step()
        if step == start_step + 1:
            write_memory_report(Path(run_dir) / "memory.json", pm.parts, optimizers, env.is_main)
        optimizers.zero_grad()
        profiled = profiler.after_step(step)
        if profiled is not None:
            share = max(r["communication_share"] for r in profiled["ranks"])
            print(f"profiled steps {profiled['ranks'][0]['steps']}: communication {share:.1%} of the time (busiest "
                  f"rank); traces and summary in {Path(run_dir) / 'profile'}", flush=True)
        window_tokens += tokens
        committed = checkpointer.poll()
        if committed is not None and env.is_main:
            print(f"saved checkpoint {committed} (written in the background)", flush=True)

        if step % cfg.logging.log_every == 0 or step == last_stop:
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed
            tflops = tps * flops_token / 1e12
            result = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                      "tokens_per_s_per_rank": tps / env.world_size, "tflops": tflops,
                      "mfu": tflops / (peak_tflops * env.world_size), "epoch": train_loader.epoch,
                      "epoch_progress": train_loader.epoch_progress, "peak_memory_gib": peak_memory_gib(env.device)}
            metrics.log(step, result)
            window_start, window_tokens = time.perf_counter(), 0

        if step % cfg.train.eval_every == 0 or step == last_stop:
            for kind, store in eval_sets:
                loader = PackedLoader(store, seq_len, gbs, pm.dp_rank, pm.dp_size, shuffle=False,
                                      document_positions=cfg.model.document_masking)
                result[kind] = evaluate(pm, loader, cfg.train.eval_batches, n_micro, env.device, amp)
                metrics.log(step, result[kind], kind=kind)
            # The val loss is all-reduced, so every rank takes the same early-stop decision.
            best_val, evals_without_gain = ((result["val"]["loss"], 0) if result["val"]["loss"] < best_val
                                            else (best_val, evals_without_gain + 1))
            early_stop = 0 < cfg.train.early_stop_patience <= evals_without_gain and step < last_stop
            if early_stop and env.is_main:
                print(f"early stop at step {step}: val loss {best_val:.4f} has not improved for "
                      f"{evals_without_gain} evaluations", flush=True)

        preempted = (stop_votes > 0 or early_stop) and step < last_stop
        if step % cfg.checkpoint.every == 0 or step == last_stop or preempted:
            meta = {"loader": train_loader.state_dict(), "config": cfg.to_dict(), "world_size": env.world_size,
                    "tokenizer_sha256": val_store.manifest["tokenizer"]["sha256"],
                    "wandb_run_id": wandb.id if wandb is not None else None}
            save_start = time.perf_counter()
            path = checkpointer.save(step, pm.parts, optimizers, meta)
            metrics.log(step, {"seconds": time.perf_counter() - save_start, "async": path is None}, kind="checkpoint")
            if env.is_main and path is not None:
                print(f"saved checkpoint {path}", flush=True)
            window_start = time.perf_counter()  # keep checkpoint time out of throughput
        if preempted:
            break
    profiler.close()
    last = checkpointer.close()
    if last is not None and env.is_main:
        print(f"saved checkpoint {last} (written in the background)", flush=True)
    if preempted and not early_stop:
        stop_request.mark_stopped(step)  # after the commit: the batch script requeues on this
        if env.is_main:
            print(f"stopped at step {step} on request (preemption or time limit); continue with --resume auto",
                  flush=True)
    metrics.close()
    train_loader.close()
    return {"step": step, **result}


def init_weights_from(model: Llama, source: str) -> None:
    """Whole-model weights from a Hugging Face directory or a megacore run/checkpoint (any backend and layout)."""
    if (Path(source) / "config.json").is_file():
        load_hf_into(model, source)
    else:
        load_model_weights(model, source)


def train_stores(cfg: Config) -> tuple[list[TokenStore], list[float]]:
    """The training split of `data.dir`, or of each `data.mixture` directory with its weight."""
    mixture = cfg.data.mixture_weights() or [(cfg.data.dir, 1.0)]
    stores = [TokenStore(path, "train") for path, _ in mixture]
    check_tokenizers(stores, cfg.data.dir, "data.mixture")
    return stores, [w for _, w in mixture]


def check_tokenizers(stores: list[TokenStore], data_dir: str, key: str) -> None:
    tokenizer = read_manifest(data_dir)["tokenizer"]["sha256"]
    for store in stores:
        if store.manifest["tokenizer"]["sha256"] != tokenizer:
            raise ConfigError(f"{key}: {store.data_dir} was tokenized with another tokenizer than data.dir={data_dir}")


def refuse_lost_work(cfg: Config, resume: str, world_size: int) -> None:
    """Before any process starts: refuse to overwrite a run's checkpoints, to resume from a path that is no
    checkpoint, or from one this run cannot load (another backend; DeepSpeed on another world size).
    Cheap (no hashing); rank 0 verifies the chosen checkpoint when training starts."""
    if resume == "none":
        checkpoint_to_resume(cfg.train.run_dir, resume)
        return
    ckpt = latest_checkpoint(cfg.train.run_dir) if resume == "auto" else Path(resume)
    if ckpt is None:
        return
    meta = read_meta(ckpt)
    backend = backend_of(meta)
    if backend != cfg.parallel.backend:
        raise ConfigError(f"{ckpt} was written with parallel.backend={backend}, this run has "
                          f"parallel.backend={cfg.parallel.backend}; use train.init_from={ckpt} (weights only)")
    if backend == "deepspeed" and meta.get("world_size") != world_size:
        raise ConfigError(f"{ckpt}: a DeepSpeed checkpoint written by {meta.get('world_size')} ranks resumes only "
                          f"on that many (this launch has {world_size}); use train.init_from={ckpt} (weights "
                          f"only) or parallel.backend=torch, whose checkpoints reshard")


def checkpoint_to_resume(run_dir: str, resume: str):
    """The checkpoint that `--resume` selects, or None to start fresh; raises if that would lose work."""
    if resume == "none":
        existing = latest_checkpoint(run_dir)
        if existing is not None:
            raise FileExistsError(f"{run_dir} already has checkpoints (newest: {existing.name}); pass "
                                  f"--resume auto to continue it, or choose another train.run_dir")
        return None
    if resume == "auto":
        return newest_good_checkpoint(run_dir)
    return resolve_checkpoint(resume)


def _train_step(pm: ParallelModel, batch, n_micro: int, device, amp, stop_here: bool) -> tuple[float, int, int]:
    """Forward/backward over this rank's micro-batches; returns (global mean loss, global target tokens,
    ranks asking to stop). The stop request rides on the loss all-reduce: no extra collective per step."""
    local_tokens = int((batch["labels"] != IGNORE_INDEX).sum()) if pm.counts_tokens else 0
    global_tokens = int(all_reduce_sum([local_tokens], device)[0])
    # FSDP averages gradients over dp ranks; scaling by dp_size makes the result sum / global_tokens.
    local_loss = pm.forward_backward(batch, n_micro, pm.dp_size / global_tokens, device, amp)
    total, stop_votes = all_reduce_sum([local_loss if pm.reports_loss else 0.0, float(stop_here)], device)
    return total / global_tokens, global_tokens, int(stop_votes)
