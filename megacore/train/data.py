"""The data a run trains and evaluates on: token stores from `data.dir`, `data.mixture` and
`train.eval_sets`, all sharing one tokenizer, and the training loader over this rank's slice."""

from __future__ import annotations

from data_pipeline.loader import PackedLoader, TokenStore
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


def train_loader(cfg: Config, dp_rank: int, dp_size: int, verify_part: tuple[int, int] = (0, 1)) -> PackedLoader:
    """The training split of `data.dir`, or of each `data.mixture` directory with its weight. With
    verify_part=(rank, world size), each rank verifies its share of the shards (TokenStore)."""
    mixture = cfg.data.mixture_weights() or [(cfg.data.dir, 1.0)]
    stores = [TokenStore(path, "train", verify_part) for path, _ in mixture]
    check_tokenizers(stores, cfg.data.dir, "data.mixture")
    return PackedLoader(stores, cfg.data.seq_len, cfg.train.global_batch_size, dp_rank, dp_size, cfg.train.seed,
                        weights=[w for _, w in mixture], num_workers=cfg.data.num_workers,
                        document_positions=cfg.model.document_masking)


def eval_stores(cfg: Config, verify_part: tuple[int, int] = (0, 1)) -> list[tuple[str, TokenStore]]:
    """("val", data.dir's val split), then ("val_NAME", store) for each train.eval_sets entry."""
    named = [(f"val_{name}", TokenStore(d, split, verify_part)) for name, d, split in cfg.train.named_eval_sets()]
    check_tokenizers([store for _, store in named], cfg.data.dir, "train.eval_sets")
    return [("val", TokenStore(cfg.data.dir, "val", verify_part)), *named]


def check_tokenizers(stores: list[TokenStore], data_dir: str, key: str) -> None:
    tokenizer = read_manifest(data_dir)["tokenizer"]["sha256"]
    for store in stores:
        if store.manifest["tokenizer"]["sha256"] != tokenizer:
            raise ConfigError(f"{key}: {store.data_dir} was tokenized with another tokenizer than data.dir={data_dir}")
