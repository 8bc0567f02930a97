"""The training loop: data -> model -> parallelize -> train step -> eval / checkpoint / metrics.

Launched once per rank (by torchrun, or directly for one process) as `train(cfg, resume)`. A `Trainer`
builds everything once (`__init__`), runs one optimizer step (`train_step`) and the loop (`fit`). Each
component decides its own timing and keeps its own state: the checkpointer (`should_save`), the metrics
logger (`should_log`), the evaluator (`should_evaluate`, early stopping), the throughput meter (paused
around evaluation and saves) and the stop request. Further per-step work goes into hooks
(megacore/train/hooks.py), not into the loop.

Loss normalisation: each step's loss is the sum of token losses over the whole global batch divided by
its number of target tokens, so any data-parallel size and any gradient-accumulation split give the
same gradients.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megacore.checkpoint.dcp import Checkpointer
from megacore.checkpoint.resume import check_can_resume, checkpoint_to_resume, effective_resume
from megacore.checkpoint.store import set_aside_newer
from megacore.checkpoint.weights import check_init_from, init_weights_from, load_weights_into_shards
from megacore.config import Config
from megacore.device import check_supported, configure, resolve_auto
from megacore.device import peak_tflops as peak_tflops_of
from megacore.distributed import DistEnv, first_failing_rank, host_all_reduce_sum, init_distributed, shutdown
from megacore.errors import USER_ERRORS
from megacore.eval.evaluate import Evaluator
from megacore.model import Llama, flops_per_token, num_params
from megacore.monitor.memory import MemoryReport, peak_memory_gib, resident_bytes
from megacore.monitor.metrics import MetricsLogger
from megacore.monitor.profiling import StepProfiler
from megacore.monitor.throughput import ThroughputMeter
from megacore.monitor.wandb_run import WandbRun
from megacore.parallel import Layout, parallelize
from megacore.run_dir import resolve_vocab_size, write_run_dir
from megacore.train.data import DeviceBatches, check_data, eval_stores, train_loader
from megacore.train.garbage import GarbageCollection
from megacore.train.hooks import StepResult
from megacore.train.optim import Optimizers, lr_at
from megacore.train.preemption import StopRequest


def train(cfg: Config, resume: str = "none", hooks: tuple = ()) -> dict:
    env = init_distributed(cfg.train.device)
    try:
        trainer = Trainer(cfg, resume, env, hooks)
        result = trainer.fit()
        # Teardown order: the model, engine and loader (cyclic references: DeepSpeed's engine, process
        # subgroups) are freed now, while the process group exists, not by the interpreter at exit
        # after it is destroyed (an abort at exit, "terminate called without an active exception").
        del trainer
        gc.collect()
        return result
    finally:
        shutdown()


class Trainer:
    def __init__(self, cfg: Config, resume: str, env: DistEnv, hooks: tuple = ()):
        self.cfg, self.env = cfg, env
        resolve_auto(cfg, env.device)  # (before the run directory records the config)
        check_supported(cfg, env.device)
        self.layout = Layout.resolve(cfg, env.world_size)
        resolve_vocab_size(cfg)
        configure(cfg, env.device)  # (its CPU allocator setting follows the model's shapes, vocabulary included)
        check_data(cfg)
        run_dir = cfg.train.run_dir
        if env.is_main:
            write_run_dir(cfg)
        dist.barrier()
        ckpt = self._choose_checkpoint(effective_resume(resume))

        torch.manual_seed(cfg.train.seed)
        self.resident_before_model = resident_bytes()
        # On the meta device: no memory. Each rank allocates only its shards once parallelism is applied.
        with torch.device("meta"):
            model = Llama(cfg.model)
        self.n_params, self._resuming = num_params(model), ckpt is not None
        self.model, self.optimizers, self.checkpointer = self._parallelize(model)
        del model
        if ckpt is None and cfg.train.init_from:
            if self.layout.backend == "torch":  # (DeepSpeed: loaded before the engine partitions)
                check_init_from(cfg)
                self._on_every_rank(lambda: load_weights_into_shards(self.model.parts, cfg.train.init_from))
            self._say(f"initialised weights from {cfg.train.init_from}")

        # Each rank verifies its share of the shards (every shard once in the job); a bad one stops every
        # rank, with one message. Shards are then opened as batches need them.
        part = (env.rank, env.world_size)
        self.train_loader, eval_sets = self._on_every_rank(
            lambda: (train_loader(cfg, self.model.dp_rank, self.model.dp_size, part), eval_stores(cfg, part)))
        self.batches = DeviceBatches(self.train_loader, env.device, cfg.model.document_masking)
        self.tokenizer_sha256 = eval_sets[0][1].manifest["tokenizer"]["sha256"]
        self.evaluator = Evaluator(self.model, eval_sets, cfg)
        self.step, resumed, self.skipped_batches = 0, {}, 0
        if ckpt is not None:
            resumed = self.checkpointer.load(ckpt, self.model.parts, self.optimizers)
            self.batches.load_state_dict(resumed["loader"])
            self.step = resumed["step"]
            self._say(f"resumed from {ckpt} at step {self.step}")

        self.wandb = WandbRun(cfg, run_dir, resumed.get("wandb_run_id")) if env.is_main else None
        self.metrics = MetricsLogger(run_dir, env.is_main, cfg.train.steps, cfg.logging.log_every, self.wandb,
                                     continues_from=self.step)
        peak_tflops, peak_source = peak_tflops_of(cfg, env.device)
        self.throughput = ThroughputMeter(flops_per_token(cfg.model, cfg.data.seq_len), peak_tflops, env.world_size)
        self.stop_request = StopRequest(run_dir, env.is_main)
        self.end_step = cfg.train.stop_after or cfg.train.steps
        self.profiler = StepProfiler(run_dir, cfg.logging.profile_start, cfg.logging.profile_steps, env.rank,
                                     env.device)
        self.gc = GarbageCollection(cfg.train.gc_every)
        self.hooks = [self.profiler, MemoryReport(Path(run_dir) / "memory.json", env.is_main), self.gc, *hooks]
        if self.step == 0:
            self._say(f"model: {self.n_params / 1e6:.2f}M parameters, {self.throughput.flops_per_token / 1e6:.1f} "
                      f"MFLOP/token; {env.world_size} rank(s) as {self.layout.describe()}; global batch "
                      f"{cfg.train.global_batch_size} x {cfg.data.seq_len} tokens in {self.layout.n_micro} "
                      f"micro-batch(es) per dp rank; {cfg.train.mixed_precision}"
                      f"{', compiled' if cfg.parallel.compile else ''}; MFU against {peak_tflops:.3f} TFLOP/s per "
                      f"rank, {peak_source} ({torch.get_num_threads()} CPU threads each)")

    def fit(self) -> dict:
        """Train from self.step to end_step, or until a stop request or early stop; returns the last step,
        why it stopped early (None: it did not) and the last logged train and eval metrics."""
        step, end, stop_reason = self.step, self.end_step, None
        train_metrics, eval_results = {}, {}
        self.model.train()
        while step < end and stop_reason is None:
            step += 1
            self._call_hooks("before_step", step)
            result = self.train_step(step)
            self.throughput.add(result.tokens)
            self._call_hooks("after_step", step, result)
            self._say_committed(self.checkpointer.poll())
            if self.metrics.should_log(step, end):
                train_metrics = self._log_train(result)
            if self.evaluator.should_evaluate(step, end):
                with self.throughput.paused():
                    eval_results = self._evaluate(step)
            stop_reason = self._stop_reason(step, result)
            if self.checkpointer.should_save(step, end, stopping=stop_reason is not None):
                with self.throughput.paused():
                    self._save(step)
        self.step = step
        self._close(stop_reason)
        return {"step": step, "stop_reason": stop_reason, "train": train_metrics, "eval": eval_results}

    def train_step(self, step: int) -> StepResult:
        """One optimizer step over the global batch. Nothing in it waits on the device: the target-token
        count and stop votes are host values (the loader's labels, signals) summed over a CPU tensor; the
        loss and gradient norm stay device tensors in the result. Besides the model's own collectives: that
        host all-reduce, one device all-reduce of the loss, and the gradient norm's."""
        pm = self.model
        stop_here = self.stop_request.requested_here()
        lr = lr_at(step, self.cfg.optim, self.cfg.train.steps)
        self.optimizers.zero_grad()
        self.optimizers.set_lr(lr)
        batch, local_tokens = self.batches.next()
        global_tokens, votes = host_all_reduce_sum([local_tokens if pm.counts_tokens else 0, int(stop_here)])
        if global_tokens == 0:
            # No targets anywhere in the global batch (chat data whose windows hold prompts only): nothing
            # to learn; every rank skips it alike, and the count is logged.
            self.skipped_batches += 1
            return StepResult(step=step, lr=lr, loss_sum=float("nan"), grad_norm_value=0.0, tokens=0,
                              stop_votes=votes)
        # FSDP averages gradients over dp ranks; scaling by dp_size makes the result sum / global_tokens.
        local_loss = pm.forward_backward(batch, pm.dp_size / global_tokens)
        total = local_loss.detach().clone() if pm.reports_loss else torch.zeros_like(local_loss)
        dist.all_reduce(total)
        grad_norm = self.optimizers.step()
        return StepResult(step=step, lr=lr, loss_sum=total, grad_norm_value=grad_norm, tokens=global_tokens,
                          stop_votes=votes)

    # -- the loop's pieces, in the order fit() calls them --

    def _call_hooks(self, event: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def _log_train(self, result: StepResult) -> dict:
        metrics = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm, **self.throughput.take(),
                   "epoch": self.batches.epoch, "epoch_progress": self.batches.epoch_progress,
                   "peak_memory_gib": peak_memory_gib(self.env.device), "skipped_batches": self.skipped_batches}
        self.metrics.log(result.step, metrics)
        return metrics

    def _evaluate(self, step: int) -> dict[str, dict]:
        results = self.evaluator.run()
        for name, metrics in results.items():
            self.metrics.log(step, metrics, kind=name)
        self._call_hooks("after_eval", step, results)
        return results

    def _stop_reason(self, step: int, result: StepResult) -> str | None:
        """Why to stop after this step, before end_step: early stop (the run is done), or a stop request
        (preemption or a time limit: the run continues after a requeue)."""
        if step >= self.end_step:
            return None
        if self.evaluator.should_stop:
            self._say(f"early stop at step {step}: val loss {self.evaluator.best_loss:.4f} has not improved for "
                      f"{self.evaluator.evals_without_gain} evaluations")
            return "early_stop"
        return "requested" if result.stop_votes > 0 else None

    def _save(self, step: int) -> None:
        meta = {"loader": self.batches.state_dict(), "config": self.cfg.to_dict(),
                "world_size": self.env.world_size, "tokenizer_sha256": self.tokenizer_sha256,
                "wandb_run_id": self.wandb.id if self.wandb is not None else None}
        start = time.perf_counter()
        path = self.checkpointer.save(step, self.model.parts, self.optimizers, meta)
        self.metrics.log(step, {"seconds": time.perf_counter() - start, "async": path is None}, kind="checkpoint")
        if path is not None:
            self._say(f"saved checkpoint {path}")
        self._call_hooks("after_save", step, path)

    def _close(self, stop_reason: str | None) -> None:
        self.profiler.close()
        self.gc.close()
        self._say_committed(self.checkpointer.close())
        if stop_reason == "requested":
            self.stop_request.mark_stopped(self.step)  # after the commit: the batch script requeues on this
            self._say(f"stopped at step {self.step} on request (preemption or time limit); continue with "
                      f"--resume auto")
        self.metrics.close()
        self.batches.close()

    # -- building --

    def _choose_checkpoint(self, resume: str) -> Path | None:
        """Rank 0 verifies and chooses the checkpoint to resume (and sets newer ones aside); every rank
        loads the same one, or every rank stops when this launch cannot continue it."""
        def choose() -> Path | None:
            if not self.env.is_main:
                return None
            ckpt = checkpoint_to_resume(self.cfg.train.run_dir, resume)
            meta = check_can_resume(ckpt, self.cfg, self.env.world_size) if ckpt is not None else None
            self._set_aside_newer(meta["step"] if meta is not None else 0)
            return ckpt

        choice = [self._on_every_rank(choose)]
        dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def _on_every_rank(self, build):
        """`build()` on every rank; if it raises an error the user can act on anywhere, the lowest such rank
        re-raises it (the one message) and every other rank exits 2 quietly: no rank is left waiting."""
        try:
            result, error = build(), None
        except USER_ERRORS as e:
            result, error = None, e
        first = first_failing_rank(error is not None, self.env.device)
        if first is None:
            return result
        if first == self.env.rank:
            raise error
        raise SystemExit(2)

    def _set_aside_newer(self, step: int) -> None:
        """One line of history: checkpoints after the one this invocation continues from are moved aside."""
        for path in set_aside_newer(self.cfg.train.run_dir, step):
            self._say(f"moved {path.name.split('.')[0]} aside to {path} (newer than the step this run continues "
                      f"from, {step}; kept, not deleted)")

    def _parallelize(self, model: Llama):
        """(model, optimizers, checkpointer) of this run's backend, with parallelism applied to `model`."""
        cfg, env, layout = self.cfg, self.env, self.layout
        if layout.backend == "deepspeed":
            from megacore.checkpoint.deepspeed import DeepSpeedCheckpointer
            from megacore.parallel.deepspeed import build_partitioned, init_deepspeed

            # ZeRO-3 partitions at construction; ZeRO-1/2 replicate the weights anyway, so their model is
            # materialised whole. Both start from the initialisation of every torch layout.
            if cfg.parallel.zero_stage == 3 and not (cfg.train.init_from and not self._resuming):
                model = build_partitioned(cfg, layout, env.device)
            else:
                model.to_empty(device=env.device)
                model.init_weights(cfg.train.seed)
                if cfg.train.init_from and not self._resuming:
                    # (Loaded whole, then partitioned by the engine: init_from into ZeRO-3 partitions is
                    # not sliced yet.)
                    check_init_from(cfg)
                    init_weights_from(model, cfg.train.init_from)
            pm, optimizers = init_deepspeed(model, cfg, layout, env.device)
            return pm, optimizers, DeepSpeedCheckpointer(cfg.train.run_dir, cfg.checkpoint, env.rank, pm.engine)
        mesh = layout.build_mesh(env.device.type)
        pm = parallelize(model, cfg, layout, mesh, env.rank, env.device)
        optimizers = Optimizers(pm.parts, cfg.optim, mesh["pp"].get_group() if layout.pp > 1 else None,
                                float8_fsdp=cfg.train.float8 and layout.dp_size > 1)
        return pm, optimizers, Checkpointer(cfg.train.run_dir, cfg.checkpoint, env.rank)

    def _say(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    def _say_committed(self, path: Path | None) -> None:
        if path is not None:
            self._say(f"saved checkpoint {path} (written in the background)")
