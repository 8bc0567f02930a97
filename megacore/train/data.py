"""The data a run trains and evaluates on: token stores from `data.dir`, `data.mixture` and
`train.eval_sets`, all sharing one tokenizer, the training loader over this rank's slice, and its
batches on the device one step ahead."""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.loader import IGNORE_INDEX, PackedLoader, TokenStore
from data_pipeline.shards import read_manifest
from megacore.config import Config
from megacore.errors import ConfigError


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
        self._ahead: tuple | None = None  # (device batch, target tokens, loader state, epoch, progress) of the next

    def _read(self) -> tuple:
        state, epoch, progress = self.loader.state_dict(), self.loader.epoch, self.loader.epoch_progress
        host = self.loader.next_batch()
        tokens = int(np.count_nonzero(host["labels"].numpy() != IGNORE_INDEX))
        pin = self.device.type == "cuda"
        batch = {k: (host[k].pin_memory() if pin else host[k]).to(self.device, non_blocking=True) for k in self.fields}
        return batch, tokens, state, epoch, progress

    def next(self) -> tuple[dict[str, torch.Tensor], int]:
        current = self._ahead if self._ahead is not None else self._read()
        self._ahead = self._read()
        return current[0], current[1]

    def state_dict(self) -> dict:
        return self._ahead[2] if self._ahead is not None else self.loader.state_dict()

    @property
    def epoch(self) -> int:
        return self._ahead[3] if self._ahead is not None else self.loader.epoch

    @property
    def epoch_progress(self) -> float:
        return self._ahead[4] if self._ahead is not None else self.loader.epoch_progress

    def load_state_dict(self, state: dict) -> None:
        self._ahead = None
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self._ahead = None
        self.loader.close()
