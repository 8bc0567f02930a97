"""The data a run trains and evaluates on: token stores from `data.dir`, `data.mixture` and
`train.eval_sets`, all sharing one tokenizer, and the training loader over this rank's slice."""

from __future__ import annotations

from data_pipeline.loader import PackedLoader, TokenStore
from data_pipeline.shards import read_manifest
from megacore.config import Config
from megacore.errors import ConfigError


def train_loader(cfg: Config, dp_rank: int, dp_size: int) -> PackedLoader:
    """The training split of `data.dir`, or of each `data.mixture` directory with its weight."""
    mixture = cfg.data.mixture_weights() or [(cfg.data.dir, 1.0)]
    stores = [TokenStore(path, "train") for path, _ in mixture]
    check_tokenizers(stores, cfg.data.dir, "data.mixture")
    return PackedLoader(stores, cfg.data.seq_len, cfg.train.global_batch_size, dp_rank, dp_size, cfg.train.seed,
                        weights=[w for _, w in mixture], num_workers=cfg.data.num_workers,
                        document_positions=cfg.model.document_masking)


def eval_stores(cfg: Config) -> list[tuple[str, TokenStore]]:
    """("val", data.dir's val split), then ("val_NAME", store) for each train.eval_sets entry."""
    named = [(f"val_{name}", TokenStore(d, split)) for name, d, split in cfg.train.named_eval_sets()]
    check_tokenizers([store for _, store in named], cfg.data.dir, "train.eval_sets")
    return [("val", TokenStore(cfg.data.dir, "val")), *named]


def check_tokenizers(stores: list[TokenStore], data_dir: str, key: str) -> None:
    tokenizer = read_manifest(data_dir)["tokenizer"]["sha256"]
    for store in stores:
        if store.manifest["tokenizer"]["sha256"] != tokenizer:
            raise ConfigError(f"{key}: {store.data_dir} was tokenized with another tokenizer than data.dir={data_dir}")
