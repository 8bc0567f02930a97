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

import contextlib
import gc
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megacore.checkpoint.dcp import Checkpointer
from megacore.checkpoint.resume import check_can_resume, checkpoint_to_resume, effective_resume
from megacore.checkpoint.store import healthy_checkpoint_before, read_meta, set_aside_newer, step_of
from megacore.checkpoint.weights import check_init_from, init_weights_from, load_weights_into_shards
from megacore.config import Config
from megacore.device import check_supported, configure, resolve_auto
from megacore.device import peak_tflops as peak_tflops_of
from megacore.distributed import DistEnv, first_failing_rank, host_all_reduce_sum, init_distributed, shutdown
from megacore.errors import USER_ERRORS
from megacore.eval.evaluate import Evaluator
from megacore.health.events import STOPPED, HealthEvents, clear_marks
from megacore.health.restarts import mark_ended, restart_loop
from megacore.health.run_health import HealthStop, RunHealth, weights_finite
from megacore.health.watchdog import Watchdog, flight_recorder_env, set_collective_timeout
from megacore.model import Llama, flops_per_token, num_params
from megacore.monitor.memory import MemoryReport, peak_memory_gib, resident_bytes
from megacore.monitor.metrics import MetricsLogger
from megacore.monitor.profiling import StepProfiler
from megacore.monitor.throughput import ThroughputMeter
from megacore.monitor.wandb_run import WandbRun
from megacore.parallel.layout import Layout
from megacore.parallel.parallelize import parallelize
from megacore.preflight import check_data
from megacore.run_dir import resolve_vocab_size, write_run_dir
from megacore.train.data import DeviceBatches, eval_stores, train_loader
from megacore.train.garbage import GarbageCollection
from megacore.train.hooks import StepResult
from megacore.train.optim import Optimizers, lr_at
from megacore.train.preemption import StopRequest


def train(cfg: Config, resume: str = "none", hooks: tuple = ()) -> dict:
    """Train on this rank; the result's stop_reason is "health" after a fatal health stop (exit status 3)."""
    flight_recorder_env(cfg.train.run_dir, cuda=cfg.train.device != "cpu" and torch.cuda.is_available())
    env = init_distributed(cfg.train.device)
    # From here on a hang (start-up included) is found and named: megacore/health/watchdog.py.
    watchdog = (Watchdog(cfg.health, cfg.train.run_dir, env.rank, env.world_size,
                         HealthEvents(cfg.train.run_dir, env.rank)) if cfg.health.hang_timeout_s > 0 else None)
    try:
        trainer = Trainer(cfg, resume, env, hooks, watchdog)
        result = trainer.fit()
        # Teardown order: the model, engine and loader (cyclic references: DeepSpeed's engine, process
        # subgroups) are freed now, while the process group exists, not by the interpreter at exit
        # after it is destroyed (an abort at exit, "terminate called without an active exception").
        del trainer
        gc.collect()
        return result
    except HealthStop:
        return {"step": None, "stop_reason": "health", "train": {}, "eval": {}}
    finally:
        if watchdog is not None:
            watchdog.close()
        shutdown()


class Trainer:
    def __init__(self, cfg: Config, resume: str, env: DistEnv, hooks: tuple = (), watchdog: Watchdog | None = None):
        self.cfg, self.env, self.watchdog = cfg, env, watchdog
        resolve_auto(cfg, env.device)  # (before the run directory records the config)
        check_supported(cfg, env.device)
        self.layout = Layout.resolve(cfg, env.world_size)
        resolve_vocab_size(cfg)
        configure(cfg, env.device)  # (its CPU allocator setting follows the model's shapes, vocabulary included)
        check_data(cfg)
        run_dir = cfg.train.run_dir
        if env.is_main:
            write_run_dir(cfg)
            clear_marks(run_dir)
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
        self.step, self.skipped_batches = 0, 0
        wandb_id = read_meta(ckpt).get("wandb_run_id") if ckpt is not None else None
        self.wandb = WandbRun(cfg, run_dir, wandb_id) if env.is_main else None
        self.health = RunHealth(cfg, env.rank, env.world_size, env.device, self.wandb, self._say)
        if ckpt is not None:
            self.step = self._load(ckpt)
            self._say(f"resumed from {ckpt} at step {self.step}")
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
        """Train from self.step to end_step, or until a stop request, an early stop or a health stop; returns
        the last step, why it stopped early (None: it did not) and the last logged train and eval metrics."""
        step, end, stop_reason = self.step, self.end_step, None
        train_metrics, eval_results = {}, {}
        self.model.train()
        while step < end and stop_reason is None:
            step += 1
            self._call_hooks("before_step", step)
            result = self.train_step(step)
            # Run health's verdicts: read now when its policy acts on each step (rerun, rollback, stop), else
            # with the logging step's reads or before a save (megacore/health/).
            every_step = self.health.policy.reads_every_step
            if every_step:
                step, result, stop_reason = self._act_on_health(step, result, stop_reason)
                if result is None:  # rolled back: continue after the checkpoint's step
                    continue
            if step == self.step + 1 and self.cfg.health.collective_timeout_s > 0:
                set_collective_timeout(self.cfg.health.collective_timeout_s)  # (the first step may compile)
            self.throughput.add(result.tokens)
            self.health.stragglers.add_step()
            self._call_hooks("after_step", step, result)
            self._say_committed(self.checkpointer.poll())
            if self.metrics.should_log(step, end):
                step, result, stop_reason = self._act_on_health(step, result)
                if result is None:
                    continue
                train_metrics = self._log_train(result)
            if self.evaluator.should_evaluate(step, end):
                with self._outside_training("eval", step):
                    eval_results = self._evaluate(step)
            stop_reason = stop_reason or self._stop_reason(step, result)
            if stop_reason != "health" and self.checkpointer.should_save(step, end, stopping=stop_reason is not None):
                # Every verdict is decided before the checkpoint records the decisions' state: a resumed run
                # then decides exactly as an uninterrupted one.
                step, result, stop_reason = self._act_on_health(step, result, stop_reason)
                if result is None:
                    continue
                if stop_reason != "health":
                    with self._outside_training("save", step):
                        self._save(step)
        self.step = step
        self._close(stop_reason)
        return {"step": step, "stop_reason": stop_reason, "train": train_metrics, "eval": eval_results}

    def train_step(self, step: int, rerun: bool = False) -> StepResult:
        """One optimizer step over the global batch (`rerun`: the same batch as the last call's). Nothing in
        it waits on the device: the target-token count and stop votes are host values (the loader's labels,
        signals) summed over a CPU tensor; the loss, gradient norm and health verdict stay device tensors in
        the result, and the optimizer applies the step or not on the device. Besides the model's own
        collectives: that host all-reduce, one device all-reduce of the loss, and the gradient norm's."""
        pm = self.model
        lr = lr_at(step, self.cfg.optim, self.cfg.train.steps)
        self.optimizers.zero_grad()
        self.optimizers.set_lr(lr)
        if self.watchdog is not None:
            self.watchdog.enter("step", step)
        if not rerun:
            stop_here = self.stop_request.requested_here()
            batch, local_tokens = self.batches.next()
            global_tokens, votes = host_all_reduce_sum([local_tokens if pm.counts_tokens else 0, int(stop_here)])
            self._step_inputs = batch, global_tokens, votes
        batch, global_tokens, votes = self._step_inputs
        if global_tokens == 0:
            # No targets anywhere in the global batch (chat data whose windows hold prompts only): nothing
            # to learn; every rank skips it alike, and the count is logged.
            self.skipped_batches += 1
            return StepResult(step=step, lr=lr, loss_sum=float("nan"), grad_norm_value=0.0, tokens=0,
                              stop_votes=votes)
        self.health.begin_step(step)
        # FSDP averages gradients over dp ranks; scaling by dp_size makes the result sum / global_tokens.
        local_loss = pm.forward_backward(batch, pm.dp_size / global_tokens)
        local_loss = self.health.faults.after_backward(step, local_loss, pm.parts)
        total = local_loss.detach().clone() if pm.reports_loss else torch.zeros_like(local_loss)
        dist.all_reduce(total)
        grad_norm, verdict = self.optimizers.step(lambda norm: self.health.verdict(step, total / global_tokens, norm))
        return StepResult(step=step, lr=lr, loss_sum=total, grad_norm_value=grad_norm, tokens=global_tokens,
                          stop_votes=votes, verdict=verdict)

    def _act_on_health(self, step: int, result: StepResult,
                       stop_reason: str | None = None) -> tuple[int, StepResult | None, str | None]:
        """Read the verdicts not yet read and act on them (megacore/health/policy.py): (the step to go on
        from, its result, the stop reason: "health" after a health stop, else `stop_reason`). A rerun
        replaces the result; a rollback returns the checkpoint's step and no result."""
        for verdict, decision in self.health.read():
            if decision.action == "rerun":
                self.health.restore_rng()
                result = self.train_step(step, rerun=True)
                ((verdict, decision),) = self.health.read(rerun_of=verdict)
            if decision.action == "rollback":
                back = self._rollback(step, decision)
                return (step, result, "health") if back is None else (back, None, None)
            if decision.action == "stop":
                self.health.stop(step, decision.reason)
                return step, result, "health"
        return step, result, stop_reason

    def _rollback(self, step: int, decision) -> int | None:
        """Back to the newest healthy checkpoint before decision.before_step (once per checkpoint on an
        escalation); its step, or None when there is none (the run then stops)."""
        target = healthy_checkpoint_before(self.cfg.train.run_dir, decision.before_step)
        if target is not None and decision.escalation and self.health.policy.escalation_target_used(step_of(target)):
            why = f"the run already rolled back to {target.name} once, and the steps after it went bad again"
            target = None
        else:
            why = f"there is no healthy checkpoint before step {decision.before_step} to roll back to"
        if target is None:
            self.health.stop(step, f"{why}: stopping (exit status 3)")
            return None
        self._say_committed(self.checkpointer.poll(block=True))
        if self.env.is_main:
            self._set_aside_newer(step_of(target))
        dist.barrier()
        back = self._load(target, rollback=True)
        self.metrics.rewind(back)
        self.health.events.emit("rollback", f"rolled back to {target.name}: replaying from step {back + 1}", back)
        return back

    # -- the loop's pieces, in the order fit() calls them --

    def _call_hooks(self, event: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def _log_train(self, result: StepResult) -> dict:
        metrics = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm, **self.throughput.take(),
                   "epoch": self.batches.epoch, "epoch_progress": self.batches.epoch_progress,
                   "peak_memory_gib": peak_memory_gib(self.env.device), "skipped_batches": self.skipped_batches}
        self.metrics.log(result.step, metrics)
        report = self.health.stragglers.report(result.step)  # (every rank: an all-gather of one float each)
        if report is not None:
            self.metrics.log(result.step, report.record(), kind="stragglers")
            if report.flagged:
                self._say(f"straggler: rank {report.slowest_rank} takes {report.slowest_ratio:.2f}x the median rank's "
                          f"time per step")
            if report.persistent:
                self.health.events.emit("straggler", f"rank {report.slowest_rank} is the slowest rank, "
                                        f"{report.slowest_ratio:.2f}x the median, for {self.cfg.health.straggler_windows}"
                                        f" logging windows in a row", result.step, **report.record())
        return metrics

    @contextlib.contextmanager
    def _outside_training(self, phase: str, step: int):
        """Evaluation and saves: out of the throughput and straggler windows, under their own hang limit."""
        if self.watchdog is not None:
            self.watchdog.enter(phase, step)
        self.health.stragglers.pause()
        with self.throughput.paused():
            yield
        self.health.stragglers.resume()

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
        """A checkpoint of this step, unless a weight is not finite (then none, and it is said): healthy
        when no skipped step is pending; retention always keeps the newest healthy one."""
        finite = weights_finite(self.model.parts).to(torch.int64)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            self.health.events.emit("checkpoint", f"the checkpoint of step {step} was not written: a weight is not "
                                    f"finite (a non-finite update); the newest checkpoint stays the last good one", step)
            return
        meta = {"loader": self.batches.state_dict(), "config": self.cfg.to_dict(),
                "world_size": self.env.world_size, "tokenizer_sha256": self.tokenizer_sha256,
                "wandb_run_id": self.wandb.id if self.wandb is not None else None,
                "health": self.health.state_dict(healthy=not self.health.in_skip_streak)}
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
        if self.env.is_main:
            mark_ended(self.cfg.train.run_dir)  # (not a crash: no restart loop)

    # -- building --

    def _choose_checkpoint(self, resume: str) -> Path | None:
        """Rank 0 verifies and chooses the checkpoint to resume (and sets newer ones aside); every rank
        loads the same one, or every rank stops when this launch cannot continue it."""
        def choose() -> tuple[Path | None, str | None]:
            if not self.env.is_main:
                return None, None
            ckpt = checkpoint_to_resume(self.cfg.train.run_dir, resume)
            meta = check_can_resume(ckpt, self.cfg, self.env.world_size) if ckpt is not None else None
            self._set_aside_newer(meta["step"] if meta is not None else 0)
            # A run that keeps restarting from the same step without ever ending is not started again.
            return ckpt, restart_loop(self.cfg.train.run_dir, meta["step"] if meta is not None else 0,
                                      self.cfg.health.max_restarts_without_progress)

        choice = [self._on_every_rank(choose)]
        dist.broadcast_object_list(choice, src=0)
        ckpt, loop = choice[0]
        if loop is not None:
            events = HealthEvents(self.cfg.train.run_dir, self.env.rank, echo=self._say)
            if self.env.is_main:
                events.emit("restart", loop)
                events.mark(STOPPED, None, loop)
            raise HealthStop(loop)
        return ckpt

    def _load(self, ckpt: Path, rollback: bool = False) -> int:
        """Weights, optimizer state, random streams, the loader's position and run health's state of a
        checkpoint (to resume, or to roll back to); returns its step."""
        meta = self.checkpointer.load(ckpt, self.model.parts, self.optimizers)
        self.batches.load_state_dict(meta["loader"])
        self.health.load_state_dict(meta.get("health", {}), rollback=rollback)
        return meta["step"]

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
