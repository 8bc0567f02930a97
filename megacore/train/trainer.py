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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megacore.checkpoint.meta import CheckpointMeta, read_meta
from megacore.checkpoint.resume import (
    check_can_resume,
    checkpoint_to_resume,
    effective_resume,
    is_branch,
    record_branch,
    run_checkpoints,
)
from megacore.checkpoint.store import healthy_checkpoint_before, set_aside_newer, step_of
from megacore.config import Config
from megacore.device import configure
from megacore.device import peak_tflops as peak_tflops_of
from megacore.distributed import DistEnv, host_all_reduce_sum, init_distributed, on_every_rank, shutdown
from megacore.eval.evaluate import Evaluator
from megacore.health.events import STOPPED, HealthEvents, clear_marks
from megacore.health.restarts import mark_ended, restart_loop
from megacore.health.run_health import HealthStop, RunHealth, weights_finite
from megacore.health.watchdog import Watchdog, flight_recorder_env, set_collective_timeout
from megacore.model import Llama, flops_per_token, num_params
from megacore.monitor.memory import MemoryReport, peak_memory_gib, peak_resident_bytes, resident_bytes
from megacore.monitor.metrics import MetricsLogger
from megacore.monitor.profiling import StepProfiler
from megacore.monitor.throughput import ThroughputMeter
from megacore.monitor.wandb_run import WandbRun
from megacore.preflight import ResolvedRun, preflight
from megacore.run_dir import MEMORY, data_tokenizer_dir, write_run_dir
from megacore.train.data import DeviceBatches, eval_stores, train_loader
from megacore.train.garbage import GarbageCollection
from megacore.train.hooks import StepResult
from megacore.train.module import build_train_module
from megacore.train.optim import lr_at
from megacore.train.preemption import StopRequest


@dataclass(frozen=True)
class FitResult:
    """How a training invocation ended on this rank."""

    step: int | None  # the last step trained (None: stopped by run health before training)
    stop_reason: str | None  # None: reached its end step; "requested", "early_stop", or "health" (exit status 3)
    train: dict = field(default_factory=dict)  # the last logged train metrics
    eval: dict = field(default_factory=dict)  # the last evaluation's results, by set name


def train(cfg: Config, resume: str = "none", hooks: tuple = ()) -> FitResult:
    """Train on this rank (preflight first: the run this config resolves to on this rank's device)."""
    flight_recorder_env(cfg.train.run_dir, cuda=cfg.train.device != "cpu" and torch.cuda.is_available())
    env = init_distributed(cfg.train.device)
    # From here on a hang (start-up included) is found and named: megacore/health/watchdog.py.
    watchdog = (Watchdog(cfg.health, cfg.train.run_dir, env.rank, env.world_size,
                         HealthEvents(cfg.train.run_dir, env.rank)) if cfg.health.hang_timeout_s > 0 else None)
    try:
        trainer = Trainer(preflight(cfg, env.world_size, env.device), resume, env, hooks, watchdog)
        result = trainer.fit()
        del trainer  # (shutdown() frees the model, engine and loader before the process group: its docstring)
        return result
    except HealthStop:
        return FitResult(step=None, stop_reason="health")
    finally:
        if watchdog is not None:
            watchdog.close()
        shutdown()


class Trainer:
    def __init__(self, run: ResolvedRun, resume: str, env: DistEnv, hooks: tuple = (), watchdog: Watchdog | None = None):
        cfg = self.cfg = run.cfg
        self.layout, self.env, self.watchdog, self.tokenizer_sha256 = run.layout, env, watchdog, run.tokenizer_sha256
        configure(cfg, env.device)  # (its CPU allocator setting follows the model's shapes, vocabulary included)
        if env.is_main:
            write_run_dir(cfg)
            clear_marks(cfg.train.run_dir)
        dist.barrier()
        ckpt = self._choose_checkpoint(effective_resume(resume))
        torch.manual_seed(cfg.train.seed)
        self.resident_before_model = resident_bytes()
        self.module = build_train_module(cfg, self.layout, env, init_from=cfg.train.init_from if ckpt is None else None)
        self.peak_after_model = peak_resident_bytes()  # (building and loading the model: memory.json)
        if ckpt is None and cfg.train.init_from:
            self._say(f"initialised weights from {cfg.train.init_from}")
        self.batches, self.evaluator = self._data()
        # (a branch from another run's checkpoint is a new W&B run)
        continues = ckpt is not None and not is_branch(ckpt, cfg)
        self.wandb = WandbRun(cfg, cfg.train.run_dir, read_meta(ckpt).wandb_run_id if continues else None) \
            if env.is_main else None
        self.health = RunHealth(cfg, env.rank, env.world_size, env.device, self.wandb, self._say)
        self.step, self.skipped_batches, self.end_step = 0, 0, cfg.train.stop_after or cfg.train.steps
        if ckpt is not None:
            self.step = self._load(ckpt)
            self._say(f"resumed from {ckpt} at step {self.step}")
        self.metrics = MetricsLogger(cfg.train.run_dir, env.is_main, cfg.train.steps, cfg.logging.log_every,
                                     self.wandb, continues_from=self.step)
        peak, peak_source = peak_tflops_of(cfg, env.device)
        self.throughput = ThroughputMeter(flops_per_token(cfg.model, cfg.data.seq_len), peak, env.world_size)
        self.stop_request = StopRequest(cfg.train.run_dir, env.is_main)
        self.profiler = StepProfiler(cfg.train.run_dir, cfg.logging.profile_start, cfg.logging.profile_steps,
                                     env.rank, env.device)
        self.gc = GarbageCollection(cfg.train.gc_every)
        self.hooks = [self.profiler, MemoryReport(Path(cfg.train.run_dir) / MEMORY, env.is_main), self.gc,
                      *hooks]
        if self.step == 0:
            self._say(self._describe(peak, peak_source))

    def fit(self) -> FitResult:
        """Train from self.step to end_step, or until a stop request, an early stop or a health stop; returns
        the last step, why it stopped early (None: it did not) and the last logged train and eval metrics."""
        step, end, stop_reason = self.step, self.end_step, None
        train_metrics, eval_results = {}, {}
        self.module.train()
        while step < end and stop_reason is None:
            step += 1
            self._call_hooks("before_step", step)
            result = self.train_step(step)
            # Run health's verdicts: read now when its policy acts on each step (rerun, rollback, stop), else
            # with the logging step's reads or before a save (megacore/health/).
            if self.health.policy.reads_every_step:
                step, result, stop_reason = self._act_on_health(step, result, stop_reason)
                if result is None:  # rolled back: continue after the checkpoint's step
                    continue
            if step == self.step + 1 and self.cfg.health.collective_timeout_s > 0:
                set_collective_timeout(self.cfg.health.collective_timeout_s)  # (the first step may compile)
            self.throughput.add(result.tokens)
            self.health.stragglers.add_step()
            self._call_hooks("after_step", step, result)
            self._say_committed(self.module.checkpointer.poll())
            if self.metrics.should_log(step, end):
                step, result, stop_reason = self._act_on_health(step, result)
                if result is None:
                    continue
                train_metrics = self._log_train(result)
            if self.evaluator.should_evaluate(step, end):
                with self._outside_training("eval", step):
                    eval_results = self._evaluate(step)
            stop_reason = stop_reason or self._stop_reason(step, result)
            if stop_reason != "health" and self.module.checkpointer.should_save(step, end, stopping=stop_reason is not None):
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
        return FitResult(step, stop_reason, train_metrics, eval_results)

    def train_step(self, step: int, rerun: bool = False) -> StepResult:
        """One optimizer step over the global batch (`rerun`: the same batch as the last call's). Nothing in
        it waits on the device: the target-token count and stop votes are host values (the loader's labels,
        signals) summed over a CPU tensor; the loss, gradient norm and health verdict stay device tensors in
        the result, and the optimizer applies the step or not on the device. Besides the model's own
        collectives: that host all-reduce, one device all-reduce of the loss, and the gradient norm's."""
        module = self.module
        lr = lr_at(step, self.cfg.optim, self.cfg.train.steps)
        module.zero_grad()
        if self.watchdog is not None:
            self.watchdog.enter("step", step)
        if not rerun:
            stop_here = self.stop_request.requested_here()
            batch, local_tokens = self.batches.next()
            global_tokens, votes = host_all_reduce_sum([local_tokens if module.counts_tokens else 0, int(stop_here)])
            self._step_inputs = batch, global_tokens, votes
        batch, global_tokens, votes = self._step_inputs
        if global_tokens == 0:
            # No targets anywhere in the global batch (chat data whose windows hold prompts only): nothing
            # to learn; every rank skips it alike, and the count is logged.
            self.skipped_batches += 1
            return StepResult(step=step, lr=lr, loss_sum=float("nan"), grad_norm_value=0.0, tokens=0,
                              stop_votes=votes)
        self.health.begin_step(step)
        # FSDP averages gradients over its ranks (dp x cp); scaling by their number makes the result
        # sum / global_tokens.
        local_loss = module.train_batch(batch, module.grad_average_size / global_tokens)
        local_loss = self.health.faults.after_backward(step, local_loss, module.parts)
        total = local_loss.detach().clone() if module.reports_loss else torch.zeros_like(local_loss)
        dist.all_reduce(total)
        grad_norm, verdict = module.optim_step(lr, lambda norm: self.health.verdict(step, total / global_tokens, norm))
        return StepResult(step=step, lr=lr, loss_sum=total, grad_norm_value=grad_norm, tokens=global_tokens,
                          stop_votes=votes, verdict=verdict, routing=dict(module.routing))

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
        # Rank 0 verifies (in object storage that reads every byte once, not on every rank) and tells the rest.
        found = [on_every_rank(lambda: healthy_checkpoint_before(run_checkpoints(self.cfg), decision.before_step)
                               if self.env.is_main else None, self.env)]
        dist.broadcast_object_list(found, src=0)
        target = found[0]
        if target is not None and decision.escalation and self.health.policy.escalation_target_used(step_of(target)):
            why = f"the run already rolled back to {target.name} once, and the steps after it went bad again"
            target = None
        else:
            why = f"there is no healthy checkpoint before step {decision.before_step} to roll back to"
        if target is None:
            self.health.stop(step, f"{why}: stopping (exit status 3)")
            return None
        self._say_committed(self.module.checkpointer.poll(block=True))
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
        # (MoE routing metrics: read back in one copy, not one per layer and metric)
        routing = dict(zip(result.routing, torch.stack(list(result.routing.values())).tolist())) \
            if result.routing else {}
        metrics = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm, **self.throughput.take(),
                   "epoch": self.batches.epoch, "epoch_progress": self.batches.epoch_progress,
                   "peak_memory_gib": peak_memory_gib(self.env.device), "skipped_batches": self.skipped_batches,
                   **routing}
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
        tasks = {name[len("eval/"):]: metrics for name, metrics in results.items() if name.startswith("eval/")}
        if tasks and self.env.is_main:
            from megacore.eval.tasks import save_results

            save_results(self.cfg.train.run_dir, step, tasks)
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
        finite = weights_finite(self.module.parts).to(torch.int64)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            self.health.events.emit("checkpoint", f"the checkpoint of step {step} was not written: a weight is not "
                                    f"finite (a non-finite update); the newest checkpoint stays the last good one", step)
            return
        meta = CheckpointMeta(step=step, config=self.cfg.to_dict(), world_size=self.env.world_size,
                              loader=self.batches.state_dict(), tokenizer_sha256=self.tokenizer_sha256,
                              wandb_run_id=self.wandb.id if self.wandb is not None else None,
                              health=self.health.state_dict(healthy=not self.health.in_skip_streak))
        start = time.perf_counter()
        path = self.module.save(step, meta)
        self.metrics.log(step, {"seconds": time.perf_counter() - start, "async": path is None}, kind="checkpoint")
        if path is not None:
            self._say(f"saved checkpoint {path}")
        self._call_hooks("after_save", step, path)

    def _close(self, stop_reason: str | None) -> None:
        self.profiler.close()
        self.gc.close()
        self._say_committed(self.module.checkpointer.close())
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
        """The checkpoint to resume: rank 0 lists the candidates, every rank verifies its share of each
        (1/world of its bytes) until one verifies, and rank 0 checks it against this launch (and sets newer
        ones aside); every rank loads the same one, or every rank stops when this launch cannot continue it."""
        ckpt = checkpoint_to_resume(self.cfg, resume, self.env, self._say)

        def choose() -> tuple[Path | None, str | None]:
            if not self.env.is_main:
                return None, None
            meta = check_can_resume(ckpt, self.cfg, self.env.world_size) if ckpt is not None else None
            if ckpt is not None and is_branch(ckpt, self.cfg):
                record_branch(ckpt, meta.step, self.cfg.train.run_dir)
                self._say(f"branching from {ckpt} (step {meta.step}) into {self.cfg.train.run_dir}")
            self._set_aside_newer(meta.step if meta is not None else 0)
            # A run that keeps restarting from the same step without ever ending is not started again.
            return ckpt, restart_loop(self.cfg.train.run_dir, meta.step if meta is not None else 0,
                                      self.cfg.health.max_restarts_without_progress)

        choice = [on_every_rank(choose, self.env)]
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
        meta = self.module.load(ckpt)
        self.batches.load_state_dict(meta.loader)
        self.health.load_state_dict(meta.health, rollback=rollback)
        return meta.step

    def _data(self) -> tuple[DeviceBatches, Evaluator]:
        """The training batches of this rank's data-parallel slice, and the evaluator. Each rank verifies
        its share of the shards (every shard once in the job); a bad one stops every rank, with one
        message. Shards are then opened as batches need them."""
        cfg, env, module = self.cfg, self.env, self.module
        part = (env.rank, env.world_size)
        loader, eval_sets = on_every_rank(
            lambda: (train_loader(cfg, module.dp_rank, module.dp_size, part), eval_stores(cfg, part)), env)
        tasks = None
        if cfg.train.eval_tasks:
            from data_pipeline.tokenizer import load_tokenizer
            from megacore.eval.tasks import TaskSet, parse_task_arg

            tasks = on_every_rank(lambda: TaskSet([parse_task_arg(s, "train.eval_tasks") for s in cfg.train.eval_tasks],
                                                  load_tokenizer(data_tokenizer_dir(cfg))), env)
            cut = tasks.longer_than(cfg.data.seq_len)
            if cut:
                self._say(f"warning: {cut} task request(s) are longer than data.seq_len={cfg.data.seq_len} tokens: in "
                          f"the loop they keep their last tokens only (`megacore eval --task` keeps the model's window)")
        return DeviceBatches(loader, env.device, cfg.model.document_masking), Evaluator(module, eval_sets, cfg, tasks)

    def _describe(self, peak_tflops: float, peak_source: str) -> str:
        cfg = self.cfg
        with torch.device("meta"):
            model = Llama(cfg.model)
        n_params, active = num_params(model), num_params(model, active=True)
        experts = (f" ({active / 1e6:.2f}M active: {cfg.model.n_active_experts} of {cfg.model.n_experts} experts)"
                   if cfg.model.moe else "")
        return (f"model: {n_params / 1e6:.2f}M parameters{experts}, {self.throughput.flops_per_token / 1e6:.1f} "
                f"MFLOP/token; "
                f"{self.env.world_size} rank(s) as {self.layout.describe()}; global batch "
                f"{cfg.train.global_batch_size} x {cfg.data.seq_len} tokens in {self.layout.n_micro} micro-batch(es) "
                f"per dp rank; {cfg.train.mixed_precision}{', compiled' if cfg.parallel.compile else ''}; MFU "
                f"against {peak_tflops:.3f} TFLOP/s per rank, {peak_source} ({torch.get_num_threads()} CPU threads "
                f"each)")

    def _set_aside_newer(self, step: int) -> None:
        """One line of history: checkpoints after the one this invocation continues from are moved aside."""
        for path in set_aside_newer(run_checkpoints(self.cfg), step):
            self._say(f"moved {path.name.split('.')[0]} aside to {path} (newer than the step this run continues "
                      f"from, {step}; kept, not deleted)")

    def _say(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    def _say_committed(self, path: Path | None) -> None:
        if path is not None:
            self._say(f"saved checkpoint {path} (written in the background)")
