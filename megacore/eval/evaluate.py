"""Evaluation: loss, perplexity, bits per byte and next-token accuracy on a prepared split.

`evaluate` runs on any parallel layout; `Evaluator` is the training run's view of it (which sets, how
often, the best val loss and early stopping); `evaluate_checkpoint` is `megacore eval`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from tqdm import tqdm

from data_pipeline.loader import PackedLoader, TokenStore
from data_pipeline.storage import Location, location
from data_pipeline.tokenizer import Tokenizer
from megacore.config import Config
from megacore.distributed import DistEnv, all_reduce_sum
from megacore.errors import DataError
from megacore.loss import IGNORE_INDEX
from megacore.run_dir import CHECKPOINTS, CONFIG

if TYPE_CHECKING:
    from megacore.train.torch_module import TorchTrainModule


@torch.no_grad()
def evaluate(module, loader: PackedLoader, max_batches: int, progress: bool = False) -> dict[str, float]:
    """Mean loss over the first `max_batches` global batches of `loader` (in order), summed over ranks.

    `module` is a train module of either backend (megacore/train/module.py), any layout. The batches are
    the same for any number of ranks, so the result does not depend on the layout. Bits per byte
    divides by the split's UTF-8 bytes per token, so it compares across tokenizers. `progress`: show
    progress on stderr (`megacore eval`; the training loop logs its own lines).
    """
    module.train(False)
    # Sums stay on the device until the one all-reduce at the end.
    sums = torch.zeros(3, dtype=torch.float64, device=module.device)
    for _ in _progress(min(max_batches, loader.batches_per_epoch), progress):
        batch = loader.next_batch()
        batch_sums = module.eval_batch(batch)
        if module.reports_loss:
            sums[0] += batch_sums.loss
            sums[1] += batch_sums.correct
        if module.counts_tokens:
            sums[2] += (batch["labels"] != IGNORE_INDEX).sum()
    total, correct, count = all_reduce_sum(sums, module.device)
    module.train(True)
    if count == 0:  # a chat split whose first batches hold prompts only
        return {"loss": math.nan, "perplexity": math.nan, "bits_per_byte": math.nan, "accuracy": math.nan, "tokens": 0}
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": loss / math.log(2) / loader.store.bytes_per_token, "accuracy": correct / count,
            "tokens": int(count)}


def _progress(batches: int, show: bool):
    """range(batches), shown on stderr: a bar on a terminal; in a log (a Slurm job's), a line every 30 s."""
    if not show:
        return range(batches)
    if sys.stderr.isatty():
        return tqdm(range(batches), desc="eval", unit="batch", leave=False)
    return _logged(batches)


def _logged(batches: int, every_s: float = 30.0):
    start = last = time.monotonic()
    for done in range(batches):
        yield done
        now = time.monotonic()
        if now - last >= every_s and done + 1 < batches:
            last = now
            print(f"eval: {done + 1}/{batches} batches, {(done + 1) / (now - start):.2f} batches/s", file=sys.stderr,
                  flush=True)


class Evaluator:
    """The eval sets of a training run, evaluated every train.eval_every steps and at the end; tracks the
    best val loss and asks to stop after train.early_stop_patience evaluations without a gain."""

    def __init__(self, module, eval_sets: list[tuple[str, TokenStore]], cfg: Config, tasks=None):
        self.module, self.eval_sets, self.tasks = module, eval_sets, tasks  # tasks: a TaskSet (train.eval_tasks)
        self.every, self.batches, self.patience = cfg.train.eval_every, cfg.train.eval_batches, cfg.train.early_stop_patience
        self.seq_len, self.global_batch = cfg.data.seq_len, cfg.train.global_batch_size
        self.document_masking = cfg.model.document_masking
        self.best_loss, self.evals_without_gain = float("inf"), 0

    def should_evaluate(self, step: int, end_step: int) -> bool:
        return step % self.every == 0 or step == end_step

    def run(self) -> dict[str, dict]:
        """{set name: metrics} for every eval set, each read from its start."""
        results = {}
        for name, store in self.eval_sets:
            loader = PackedLoader(store, self.seq_len, self.global_batch, self.module.dp_rank, self.module.dp_size,
                                  shuffle=False, document_positions=self.document_masking)
            results[name] = evaluate(self.module, loader, self.batches)
        if self.tasks is not None:  # each data-parallel slice scores its share; every rank gets the results
            rows = self.global_batch // self.module.dp_size
            results.update({f"eval/{name}": metrics
                            for name, metrics in self.tasks.run(self.module, self.seq_len, rows).items()})
        # The val loss is all-reduced, so every rank takes the same early-stop decision.
        if results["val"]["loss"] < self.best_loss:
            self.best_loss, self.evals_without_gain = results["val"]["loss"], 0
        else:
            self.evals_without_gain += 1
        return results

    @property
    def should_stop(self) -> bool:
        return 0 < self.patience <= self.evals_without_gain


class EvalSession(NamedTuple):
    """A trained model ready to evaluate or sample on this rank."""

    module: TorchTrainModule  # without optimizers
    tokenizer: Tokenizer
    config: Config
    source: str | Location  # the checkpoint, or the published directory
    env: DistEnv  # this rank


@contextlib.contextmanager
def trained_module(path: str, batch_size: int | None = None, overrides: list[str] = (), micro_batches: bool = False,
                   check=None) -> Iterator[EvalSession]:
    """The model of `path` as an evaluation module: whole on one process (as load_trained gives it; with
    `micro_batches`, a batch runs in the run's train.micro_batch_size pieces), or, on a rank of
    `--nproc N`, sharded over the ranks by the run's parallel settings and `overrides`
    (megacore/eval/sharded.py). `check(cfg)`: a further rule for the resolved config."""
    from launcher.torchrun import under_torchrun
    from megacore.distributed import init_distributed, shutdown

    if not under_torchrun():
        from megacore.checkpoint.weights import load_trained
        from megacore.parallel.layout import Layout
        from megacore.train.torch_module import TorchTrainModule

        trained = load_trained(path)
        n_micro = max(1, batch_size // trained.config.train.micro_batch_size) if micro_batches and batch_size else 1
        env = init_distributed("cpu")
        try:
            loss = _prepared_loss(trained.model)
            module = TorchTrainModule([(0, trained.model)], Layout(n_micro=n_micro), env.rank, torch.device("cpu"),
                                      loss, document_masking=trained.config.model.document_masking)
            yield EvalSession(module, trained.tokenizer, trained.config, trained.source, env)
        finally:
            shutdown()
        return
    from megacore.checkpoint.weights import agreed_source, trained_config
    from megacore.eval.sharded import eval_config, sharded_module

    env = init_distributed("auto")  # (CUDA where there is one; results equal the CPU's one process in fp32)
    try:
        source = agreed_source(path, env)
        cfg, tokenizer, _ = trained_config(source, verify=False)
        cfg = eval_config(cfg, list(overrides), env.world_size, batch_size)
        if check is not None:
            check(cfg)
        yield EvalSession(sharded_module(cfg, source, env), tokenizer, cfg, source, env)
    finally:
        shutdown()


def _prepared_loss(model):
    from megacore.loss import LanguageModelLoss

    loss = LanguageModelLoss.for_run(tp=1, compiled=False)
    loss.prepare(model)
    return loss


def evaluate_checkpoint(path: str, split: str = "val", data_dir: str | None = None, text: list[str] | None = None,
                        batch_size: int = 16, batches: int = 0, overrides: list[str] = ()) -> dict | None:
    """`megacore eval`: a trained model (any backend, any layout) on a prepared split or on raw text files
    tokenized with the run's tokenizer; on one process, or sharded over the ranks of `--nproc N` (the
    result on rank 0; None on the others)."""
    with trained_module(path, batch_size, overrides, micro_batches=True) as run, \
            tempfile.TemporaryDirectory() as tmp:
        tokenizer, ckpt, cfg = run.tokenizer, run.source, run.config
        if text:
            from data_pipeline.prepare import prepare

            prepare(dataclasses.replace(cfg.data, dir=tmp, sources=text, format="text", val_fraction=0.0,
                                        tokenizer_from=str(tokenizer.path)), log=lambda *_: None)
            store, split = TokenStore(tmp, "train"), ",".join(text)
        else:
            store = TokenStore(data_dir or cfg.data.dir, split)
            if store.manifest["tokenizer"]["sha256"] != tokenizer.sha256:
                raise DataError(f"--data-dir {store.data_dir} is tokenized with tokenizer sha256 "
                                f"{store.manifest['tokenizer']['sha256']}, but {ckpt} was trained with "
                                f"{tokenizer.sha256}: prepare it with data.tokenizer_from={_tokenizer_of(ckpt)}")
        module = run.module
        loader = PackedLoader(store, cfg.data.seq_len, batch_size, module.dp_rank, module.dp_size, shuffle=False)
        result = evaluate(module, loader, batches or loader.batches_per_epoch, progress=run.env.is_main)
        return {"checkpoint": str(ckpt), "split": split, **result} if run.env.is_main else None


def evaluate_tasks(path: str, task_args: list[str], batch_size: int = 16, overrides: list[str] = ()) -> dict | None:
    """`megacore eval --task NAME=FILE ...`: downstream tasks (megacore/eval/tasks.py) with the model's own
    tokenizer, on one process or sharded over `--nproc N` ranks (each data-parallel rank scores its share);
    saved in RUN_DIR/evals/step_N.json for a megacore run (by rank 0, which alone returns the results)."""
    from megacore.checkpoint.meta import read_meta
    from megacore.eval.tasks import TaskSet, parse_task_arg, save_results

    specs = [parse_task_arg(arg) for arg in task_args]
    with trained_module(path, batch_size, overrides) as run:
        tasks = TaskSet(specs, run.tokenizer)
        longest = max(len(r.context) + len(r.continuation) for requests in tasks.requests for r in requests)
        seq_len = min(run.config.model.max_seq_len, longest - 1)
        results = tasks.run(run.module, seq_len, batch_size // run.module.dp_size)
        if not run.env.is_main:
            return None
    ckpt = location(run.source)
    out = {"checkpoint": str(run.source), "tasks": results}
    # Saved in the run directory around a run's checkpoint (not for a published directory, nor for a
    # checkpoint in a checkpoint.dir of its own: no run directory is known there).
    if isinstance(ckpt, Path) and ckpt.parent.name == CHECKPOINTS and (ckpt.parent.parent / CONFIG).is_file():
        out["saved"] = str(save_results(ckpt.parent.parent, read_meta(ckpt).step, results))
    return out


def _tokenizer_of(source) -> str:
    """Where the tokenizer of a trained model lies, for a message: a published directory, or a checkpoint's
    run files."""
    from megacore.checkpoint.weights import is_published
    from megacore.run_dir import run_files_of

    return str(source if is_published(source) else run_files_of(location(source)))
