"""The data a run trains and evaluates on: token stores from `data.dir`, `data.mixture` and
`train.eval_sets`, all sharing one tokenizer, the training loader over this rank's slice, and its
batches on the device one step ahead, split into micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.loader import IGNORE_INDEX, PackedLoader, TokenStore
from data_pipeline.shard_cache import ShardCache
from data_pipeline.shards import read_manifest
from megacore.config import Config
from megacore.errors import DataError


def train_loader(cfg: Config, dp_rank: int, dp_size: int, verify_part: tuple[int, int] = (0, 1)) -> PackedLoader:
    """The training split of `data.dir`, or of each `data.mixture` directory with its weight. With
    verify_part=(rank, world size), each rank verifies its share of the shards (TokenStore)."""
    mixture = cfg.data.mixture_weights() or [(cfg.data.dir, 1.0)]
    stores = [TokenStore(path, "train", verify_part, shard_cache(cfg)) for path, _ in mixture]
    check_tokenizers(stores, cfg.data.dir, "data.mixture")
    return PackedLoader(stores, cfg.data.seq_len, cfg.train.global_batch_size, dp_rank, dp_size, cfg.train.seed,
                        weights=[w for _, w in mixture], num_workers=cfg.data.num_workers,
                        document_positions=cfg.model.document_masking)


def eval_stores(cfg: Config, verify_part: tuple[int, int] = (0, 1)) -> list[tuple[str, TokenStore]]:
    """("val", data.dir's val split), then ("val_NAME", store) for each train.eval_sets entry."""
    cache = shard_cache(cfg)
    named = [(f"val_{name}", TokenStore(d, split, verify_part, cache)) for name, d, split in cfg.train.named_eval_sets()]
    check_tokenizers([store for _, store in named], cfg.data.dir, "train.eval_sets")
    return [("val", TokenStore(cfg.data.dir, "val", verify_part, cache)), *named]


def shard_cache(cfg: Config) -> ShardCache:
    """Where shards of data in object storage are kept on this node (data.cache_dir, data.cache_gb)."""
    return ShardCache(cfg.data.cache_dir or None, cfg.data.cache_gb)


def check_tokenizers(stores: list[TokenStore], data_dir: str, key: str) -> None:
    tokenizer = read_manifest(data_dir)["tokenizer"]["sha256"]
    for store in stores:
        if store.manifest["tokenizer"]["sha256"] != tokenizer:
            raise DataError(f"{key}: {store.data_dir} was tokenized with another tokenizer than data.dir={data_dir}")


@dataclass(frozen=True)
class _ReadAhead:
    """A batch read one step early, and the loader's position from before it was read."""

    batch: dict[str, torch.Tensor]  # on the device (its copy may still be in flight)
    target_tokens: int
    loader_state: dict
    epoch: int
    epoch_progress: float


class DeviceBatches:
    """The training loader's batches on the device, copied one step ahead.

    `next()` returns the batch read during the previous call (already on the device) and its count of
    target tokens, then reads the following one, pins it (CUDA) and starts its copy with non_blocking,
    so the copy overlaps this step's compute. The target count comes from the host-side labels, so
    nothing waits on the device. `state_dict()` is the loader's state as of the batches handed out (not
    the one read ahead): a checkpoint resumes exactly at the next unseen batch.
    """

    def __init__(self, loader: PackedLoader, device: torch.device, positions: bool):
        self.loader, self.device = loader, device
        self.fields = ("input_ids", "labels", "position_ids") if positions else ("input_ids", "labels")
        self._ahead: _ReadAhead | None = None  # the next batch, already read

    def _read(self) -> _ReadAhead:
        state, epoch, progress = self.loader.state_dict(), self.loader.epoch, self.loader.epoch_progress
        host = self.loader.next_batch()
        tokens = int(np.count_nonzero(host["labels"].numpy() != IGNORE_INDEX))
        pin = self.device.type == "cuda"
        batch = {k: (host[k].pin_memory() if pin else host[k]).to(self.device, non_blocking=True) for k in self.fields}
        return _ReadAhead(batch, tokens, state, epoch, progress)

    def next(self) -> tuple[dict[str, torch.Tensor], int]:
        """(the batch on the device, its count of target tokens)."""
        current = self._ahead if self._ahead is not None else self._read()
        self._ahead = self._read()
        return current.batch, current.target_tokens

    def state_dict(self) -> dict:
        return self._ahead.loader_state if self._ahead is not None else self.loader.state_dict()

    @property
    def epoch(self) -> int:
        return self._ahead.epoch if self._ahead is not None else self.loader.epoch

    @property
    def epoch_progress(self) -> float:
        return self._ahead.epoch_progress if self._ahead is not None else self.loader.epoch_progress

    def load_state_dict(self, state: dict) -> None:
        self._ahead = None
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self._ahead = None
        self.loader.close()


def micro_batches(batch: dict, n_micro: int, device: torch.device, document_masking: bool) -> list[tuple]:
    """(inputs, labels, position_ids or None) of each micro-batch, on the device (a no-op for a batch
    already there: the trainer's batches arrive one step ahead, megacore/train/data.py)."""
    inputs, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    positions = batch["position_ids"].to(device).chunk(n_micro) if document_masking else [None] * n_micro
    return list(zip(inputs.chunk(n_micro), labels.chunk(n_micro), positions))
