"""Deterministic, resumable, rank-sliced loader of packed token windows.

The token stream of a split is the concatenation of its shards (documents already end in EOS).
Sample i is the window stream[i * seq_len : i * seq_len + seq_len + 1]: inputs are its first seq_len
tokens, labels its last seq_len, so every token is a target exactly once per epoch.

The global order of samples is a pure function of (seed, epoch, data fingerprint): a permutation per
epoch. Global batch s is order[s*B : (s+1)*B]; data-parallel rank r takes the r-th contiguous slice.
The state is therefore tiny, {epoch, consumed_samples, seed, fingerprint, seq_len}, and a run resumes
on any number of data-parallel ranks and continues the same global sequence of batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_pipeline.shards import read_manifest, read_shard


class TokenStore:
    """The memory-mapped token stream of one split."""

    def __init__(self, data_dir: str | Path, split: str):
        self.data_dir = Path(data_dir)
        manifest = read_manifest(self.data_dir)
        if split not in manifest["splits"]:
            raise ValueError(f"{self.data_dir}: no split {split!r} (have: {', '.join(manifest['splits'])})")
        self.manifest = manifest
        self.split = split
        self.fingerprint: str = manifest["fingerprint"]
        info = manifest["splits"][split]
        self.bytes_per_token = info["bytes"] / info["tokens"]
        self._values = []
        for shard in info["shards"]:
            path = self.data_dir / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"token shard missing: {path} (named in {self.data_dir / 'manifest.json'})")
            values, _ = read_shard(path)
            if len(values) != shard["tokens"]:
                raise ValueError(f"token shard {path} holds {len(values)} tokens, manifest says {shard['tokens']}")
            self._values.append(values)
        self._starts = np.cumsum([0] + [len(v) for v in self._values])
        self.num_tokens = int(self._starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across shard boundaries if needed."""
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        shard = int(np.searchsorted(self._starts, pos, side="right")) - 1
        while filled < length:
            values = self._values[shard]
            offset = pos - self._starts[shard]
            take = min(length - filled, len(values) - offset)
            out[filled:filled + take] = values[offset:offset + take]
            filled, pos, shard = filled + take, pos + take, shard + 1
        return out


class PackedLoader:
    """Yields this rank's slice of each global batch: {"input_ids", "labels"} of shape (B / dp, seq_len)."""

    def __init__(self, store: TokenStore, seq_len: int, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        if global_batch_size % dp_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {dp_size} data-parallel ranks")
        self.store, self.seq_len, self.seed, self.shuffle = store, seq_len, seed, shuffle
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.num_samples = (store.num_tokens - 1) // seq_len
        self.batches_per_epoch = self.num_samples // global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"split {store.split!r} of {store.data_dir} has {store.num_tokens} tokens: too few for one global "
                f"batch of {global_batch_size} x {seq_len} tokens")
        self.epoch = 0
        self.consumed_samples = 0  # within the current epoch, counted globally over all ranks
        self._order_epoch, self._order = -1, None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch, int(self.store.fingerprint, 16)])
                self._order = rng.permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples)
            self._order_epoch = self.epoch
        return self._order

    def global_batch_ids(self) -> np.ndarray:
        """Sample ids of the next global batch (all ranks), without consuming it."""
        if self.consumed_samples + self.global_batch_size > self.batches_per_epoch * self.global_batch_size:
            # The remainder of an epoch that does not fill a global batch is dropped.
            self.epoch, self.consumed_samples = self.epoch + 1, 0
        start = self.consumed_samples
        return self._epoch_order()[start:start + self.global_batch_size]

    def next_batch(self) -> dict[str, torch.Tensor]:
        ids = self.global_batch_ids()
        per_rank = self.global_batch_size // self.dp_size
        local = ids[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        windows = np.stack([self.store.read(int(i) * self.seq_len, self.seq_len + 1) for i in local])
        self.consumed_samples += self.global_batch_size
        tokens = torch.from_numpy(windows)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed_samples": self.consumed_samples, "seed": self.seed,
                "fingerprint": self.store.fingerprint, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.store.fingerprint:
            raise ValueError(
                f"data changed since the checkpoint: fingerprint {state['fingerprint']} in the checkpoint, "
                f"{self.store.fingerprint} in {self.store.data_dir}")
        for key in ("seed", "seq_len"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader {key} changed since the checkpoint: {state[key]} -> {getattr(self, key)}")
        self.epoch, self.consumed_samples = int(state["epoch"]), int(state["consumed_samples"])
