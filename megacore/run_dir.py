"""The run directory: every file one training run leaves, named here (the modules that write them import
these names).

    RUN_DIR/config.yaml       the resolved config (megacore/preflight.py: vocab size, auto settings filled in)
    RUN_DIR/tokenizer.model   the tokenizer the run was trained with, so eval/generate need no data dir
                              (tokenizer.json, tokenizer_config.json, chat_template.jinja for a published model's)
    RUN_DIR/metrics.jsonl     one line per logged step (megacore/monitor/metrics.py), and
    RUN_DIR/metrics.superseded.jsonl  the records a resume or rollback replaced
    RUN_DIR/loss.png          `megacore plot` (megacore/monitor/plot.py)
    RUN_DIR/memory.json       each rank's memory after the first and last steps (megacore/monitor/memory.py)
    RUN_DIR/checkpoints/      step_XXXXXXXX/ checkpoints (megacore/checkpoint/), unless checkpoint.dir names
                              another place (a URL); each checkpoint's run/ holds config.yaml and the
                              tokenizer files (RUN_FILES), so that it is usable without this directory
    RUN_DIR/profile/          torch profiler traces and their summary (megacore/monitor/profiling.py)
    RUN_DIR/wandb_run.json    the W&B run id every restart continues (megacore/monitor/wandb_run.py)
    RUN_DIR/evals/            step_XXXXXXXX.json: downstream task results (megacore/eval/tasks.py)
    RUN_DIR/branch.json       the checkpoint of another run this one started from (`--resume CKPT`: an
                              annealing branch; megacore/checkpoint/resume.py)
    RUN_DIR/STOP, PREEMPTED   a stop request, and the step a requested stop ended at (megacore/train/preemption.py)
    RUN_DIR/health/           events.jsonl, starts.jsonl, STOPPED, HANG, heartbeats/, stacks/ (megacore/health/)
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline.shards import TOKENIZER, read_manifest
from data_pipeline.storage import Location, cache_dir_for, download, download_tree, is_url, location
from megacore.config import Config, load_config, save_config

CONFIG = "config.yaml"
METRICS, SUPERSEDED, PLOT = "metrics.jsonl", "metrics.superseded.jsonl", "loss.png"
MEMORY = "memory.json"
CHECKPOINTS = "checkpoints"
PROFILE = "profile"
WANDB_STATE = "wandb_run.json"
BRANCH = "branch.json"
EVALS = "evals"
RUN_FILES = "run"  # (inside a checkpoint)
STOP, PREEMPTED = "STOP", "PREEMPTED"
HEALTH_DIR, EVENTS, STARTS, STOPPED, HANG = "health", "events.jsonl", "starts.jsonl", "STOPPED", "HANG"
HEARTBEATS, STACKS = "heartbeats", "stacks"  # (inside HEALTH_DIR)


def write_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG)
    for name in tokenizer_files(cfg):
        download(location(cfg.data.dir) / name, run_dir / name)  # (data.dir may be in object storage)
    return run_dir


def tokenizer_files(cfg: Config) -> list[str]:
    """The tokenizer's files, relative to data.dir (and to the run directory: chat templates keep their folder)."""
    tokenizer = read_manifest(cfg.data.dir)["tokenizer"]
    return tokenizer.get("files", [tokenizer.get("file", TOKENIZER)])


def data_tokenizer_dir(cfg: Config) -> Path:
    """A local directory holding data.dir's tokenizer: data.dir itself, or its tokenizer files downloaded
    into this node's cache when data.dir is in object storage (a few MB)."""
    if not is_url(cfg.data.dir):
        return Path(cfg.data.dir)
    local = cache_dir_for("tokenizers", cfg.data.dir)
    for name in tokenizer_files(cfg):
        download(location(cfg.data.dir) / name, local / name)
    return local


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"not a run directory (no {CONFIG}): {run_dir}")
    return load_config(path)


def run_files_of(ckpt: Location) -> Location:
    """Where the config and tokenizer a checkpoint was trained with lie: its own run/ (checkpoints since
    object storage), else the run directory around it (older local checkpoints)."""
    own = ckpt / RUN_FILES
    if not isinstance(ckpt, Path) or (own / CONFIG).is_file():
        return own
    return ckpt.parent.parent


def checkpoint_run_files(ckpt: Location) -> Path:
    """`run_files_of(ckpt)` on local disk: itself, or downloaded into this node's cache from a store."""
    where = run_files_of(ckpt)
    if isinstance(where, Path):
        return where
    if not (where / CONFIG).is_file():
        raise FileNotFoundError(f"{ckpt}: no {RUN_FILES}/{CONFIG} (not a megacore checkpoint?)")
    return download_tree(where, cache_dir_for("run-files", ckpt))
