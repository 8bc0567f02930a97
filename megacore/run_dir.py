"""The run directory: resolved config, tokenizer copy, metrics and checkpoints of one training run.

    RUN_DIR/config.yaml       the resolved config (vocab size filled in)
    RUN_DIR/tokenizer.model   the tokenizer the run was trained with, so eval/generate need no data dir
                              (tokenizer.json, tokenizer_config.json, chat_template.jinja for a published model's)
    RUN_DIR/metrics.jsonl     one line per logged step
    RUN_DIR/checkpoints/      step_XXXXXXXX/ sharded checkpoints
"""

from __future__ import annotations

import shutil
from pathlib import Path

from data_pipeline.shards import TOKENIZER, read_manifest
from megacore.config import Config, ConfigError, load_config, save_config

CONFIG = "config.yaml"


def resolve_vocab_size(cfg: Config) -> dict:
    """Fill model.vocab_size from the prepared data's tokenizer; returns the data manifest."""
    manifest = read_manifest(cfg.data.dir)
    vocab = manifest["tokenizer"]["vocab_size"]
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab} "
                          f"in {cfg.data.dir}")
    return manifest


def write_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG)
    tokenizer = read_manifest(cfg.data.dir)["tokenizer"]
    for name in tokenizer.get("files", [tokenizer.get("file", TOKENIZER)]):  # (relative: chat templates' folder)
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(cfg.data.dir) / name, run_dir / name)
    return run_dir


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"not a run directory (no {CONFIG}): {run_dir}")
    return load_config(path)
