"""What is checked before any process starts (by `megacore train` before it launches ranks, and again by
each rank): manifests and config only, so that the check imports no torch and costs no time."""

from __future__ import annotations

from data_pipeline.shards import read_manifest
from megacore.config import Config
from megacore.errors import ConfigError


def check_data(cfg: Config) -> None:
    """Before any process starts: every split the run reads exists and holds at least one window of
    data.seq_len + 1 tokens (a manifest read per directory; no shard is opened)."""
    window = cfg.data.seq_len + 1
    mixture = cfg.data.mixture_weights() or [(cfg.data.dir, 1.0)]
    reads = [("data.mixture" if cfg.data.mixture else "data.dir", d, "train") for d, _ in mixture]
    reads.append(("data.dir", cfg.data.dir, "val"))
    reads += [(f"train.eval_sets ({name})", d, split) for name, d, split in cfg.train.named_eval_sets()]
    for key, directory, split in reads:
        splits = read_manifest(directory)["splits"]
        if split not in splits:
            why = (" (prepared with data.val_fraction=0?); training evaluates on it every train.eval_every steps: "
                   "prepare with data.val_fraction > 0" if split == "val" else "")
            raise ConfigError(f"{key}={directory} has no {split!r} split (it has: {', '.join(splits)}){why}")
        tokens = splits[split]["tokens"]
        if tokens < window:
            raise ConfigError(f"{key}={directory}: the {split!r} split holds {tokens} tokens, fewer than one window of "
                              f"data.seq_len + 1 = {window}; add data, raise data.val_fraction, or lower data.seq_len")
