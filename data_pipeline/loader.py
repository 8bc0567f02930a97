"""Deterministic, resumable, rank-sliced loader of packed token windows.

The token stream of a split is the concatenation of its shards (documents already end in EOS).
Sample i is the window stream[i * seq_len : i * seq_len + seq_len + 1]: inputs are its first seq_len
tokens, labels its last seq_len, so every token is a target exactly once per epoch.

Order. A dataset's samples form an endless sequence over epochs: position p is sample
perm(seed, epoch = p // N, fingerprint)(p % N), a keyed Feistel permutation evaluated on demand
(data_pipeline/permutation.py): memory per rank does not grow with the corpus. A mixture of datasets
assigns global sample positions to datasets in order of due time, dataset j's k-th sample being due at
(k + 1) / weight_j (stride scheduling: every dataset stays within a sample or so of its share at any
point, as Megatron's blended datasets do), computed for a whole batch at once, so the order is a pure
function of (seed, weights, fingerprints, seq_len) and of how many samples each dataset has given.
Global batch b holds the next global_batch_size samples; data-parallel rank r takes the r-th contiguous
slice.

State. {version, step, positions per dataset, seed, fingerprints, seq_len, order, mixing}: a handful of
integers. It does not depend on the number of ranks or workers, so a run resumes on another data-parallel size or worker
count and continues the same global sequence of batches. A state written by an earlier commit is upgraded
when loaded (data_pipeline/upgrade.py); a run that began before today's order or mixing rule continues
with the rule its state names, looked up once when the state is loaded (ORDERS, MIXING).
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from data_pipeline.errors import DataError, ShardError
from data_pipeline.permutation import FeistelOrder, SequentialOrder
from data_pipeline.shard_cache import ShardCache
from data_pipeline.shards import file_sha256, read_manifest, read_shard
from data_pipeline.storage import exists, is_url, listing, location
from data_pipeline.upgrade import LOADER_STATE_VERSION, MaterialisedOrder, deficit_mix, upgrade_loader_state

# The label of a token that is no training target (torch's cross_entropy default ignore_index).
IGNORE_INDEX = -100


# Shards this process has verified, by (path, sha256): each is hashed once per process however many
# stores and loaders open it (training, every evaluation).
_VERIFIED: set[tuple[str, str]] = set()


def verify_shard(path: Path, record: dict, values: np.ndarray, vocab_size: int, hashed: bool = False) -> None:
    """The shard is the one the manifest describes (sha256, token count) and holds only ids below the
    tokenizer's vocabulary size; ShardError naming the file otherwise. `hashed`: its sha256 was already
    taken (the shard cache hashes a download as it arrives), so it is not read again."""
    key = (str(path.resolve()), record["sha256"])
    if key in _VERIFIED:
        return
    if len(values) != record["tokens"]:
        raise ShardError(f"token shard {path} holds {len(values)} tokens, its manifest says {record['tokens']}")
    if not hashed and file_sha256(path) != record["sha256"]:
        raise ShardError(f"token shard {path}: sha256 differs from its manifest (altered or corrupt); "
                         f"`megacore data verify {path.parent}` lists every bad file, `data prepare` rewrites them")
    top = int(values.max()) if len(values) else 0
    if top >= vocab_size:
        raise ShardError(f"token shard {path} holds token id {top}, not below the tokenizer's vocabulary size "
                         f"{vocab_size}")
    _VERIFIED.add(key)


# Open memory maps per store. A corpus of trillions of tokens has tens of thousands of shards: mapping
# them all on every rank would meet the file-descriptor and vm.max_map_count limits. Shards are opened
# when a batch first needs them and the least recently used map is closed beyond this many.
MAX_OPEN_SHARDS = 256


class TokenStore:
    """The memory-mapped token stream of one split, its shards opened lazily with a bounded cache.

    Verification (sha256, token count, ids below the vocabulary): `verify_part=(i, n)` makes this
    store verify shards i, i + n, i + 2n, ... at construction, for a job whose n processes together
    verify every shard once and stop together if any fails (the trainer passes (rank, world size));
    the default (0, 1) verifies them all here. Every shard's existence and token count are checked
    by every store.

    A directory in object storage (an s3:// URL) is read through a bounded local cache of whole shards
    (data_pipeline/shard_cache.py): each shard is verified as it is downloaded, when a batch first needs
    it, instead of at construction (one listing checks that every shard exists).
    """

    def __init__(self, data_dir: str | Path, split: str, verify_part: tuple[int, int] = (0, 1),
                 cache: ShardCache | None = None):
        self.data_dir = location(data_dir)
        self.remote = is_url(data_dir)
        self.cache = (cache or ShardCache()) if self.remote else None
        manifest = read_manifest(self.data_dir)
        if split not in manifest["splits"]:
            raise DataError(f"{self.data_dir}: no split {split!r} (have: {', '.join(manifest['splits'])})")
        self.manifest, self.split = manifest, split
        tokenizer = self.data_dir / manifest["tokenizer"]["file"]
        if not exists(tokenizer):
            raise FileNotFoundError(f"tokenizer missing: {tokenizer} (named in {self.data_dir / 'manifest.json'})")
        self.fingerprint: str = manifest["fingerprint"]
        self.eos_id: int = manifest["tokenizer"]["eos_id"]
        info = manifest["splits"][split]
        self.bytes_per_token = info["bytes"] / info["tokens"]
        self._records = info["shards"]
        present = {p.name for p in listing(self.data_dir)} if self.remote else None
        for shard in self._records:  # one stat per shard (one listing in a store); nothing is opened
            path = self.data_dir / shard["file"]
            if not (shard["file"] in present if self.remote else path.is_file()):
                raise ShardError(f"token shard missing: {path} (named in {self.data_dir / 'manifest.json'})")
        self._starts = np.cumsum([0] + [int(s["tokens"]) for s in self._records])
        self.num_tokens = int(self._starts[-1])
        self._maps: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self._lock = threading.Lock()  # loader worker threads share the cache
        index, count = verify_part
        for i in range(index, len(self._records), count) if not self.remote else ():
            path = self.data_dir / self._records[i]["file"]
            values, _, _ = read_shard(path, loss_mask=True)
            verify_shard(path, self._records[i], values, manifest["tokenizer"]["vocab_size"])
        # Chat data: a 0/1 loss weight per token (prompt tokens 0); plain text has none (all trained).
        # Every shard of a split has the schema `data prepare` gave the first.
        self._has_mask = self._shard(0)[1] is not None if self._records else False

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(token values, loss mask or None) of shard i, memory-mapped; at most MAX_OPEN_SHARDS kept."""
        entry = self._maps.get(i)
        if entry is not None and len(self._maps) < MAX_OPEN_SHARDS:
            return entry  # nothing to evict yet: no recency to keep, no lock
        with self._lock:
            if i in self._maps:
                self._maps.move_to_end(i)
                return self._maps[i]
            path = self.data_dir / self._records[i]["file"]
            if self.remote:  # a verified copy in the local cache (its sha256 taken as it downloads)
                path = self.cache.fetch(path, self._records[i]["sha256"])
            values, _, mask = read_shard(path, loss_mask=True)
            if self.remote:
                verify_shard(path, self._records[i], values, self.manifest["tokenizer"]["vocab_size"], hashed=True)
            elif len(values) != self._records[i]["tokens"]:
                raise ShardError(f"token shard {path} holds {len(values)} tokens, its manifest says "
                                 f"{self._records[i]['tokens']}")
            self._maps[i] = (values, mask)
            if len(self._maps) > MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)  # its map closes with the last view of it
            return values, mask

    @property
    def open_shards(self) -> int:
        return len(self._maps)

    @property
    def has_loss_mask(self) -> bool:
        return self._has_mask

    def _array(self, shard: int, loss_mask: bool) -> np.ndarray:
        values, mask = self._shard(int(shard))
        return mask if loss_mask else values

    def windows(self, starts: np.ndarray, length: int, loss_mask: bool = False) -> np.ndarray:
        """Rows stream[start : start + length] for each start, gathered shard by shard (or the same rows
        of the loss mask)."""
        out = np.empty((len(starts), length), dtype=np.int64)
        shard_of = np.searchsorted(self._starts, starts, side="right") - 1
        inside = starts + length <= self._starts[shard_of + 1]
        for shard in np.unique(shard_of[inside]):
            rows = np.flatnonzero(inside & (shard_of == shard))
            # Row gather from a (no-copy) view of every window: one memcpy per row.
            view = np.lib.stride_tricks.sliding_window_view(self._array(shard, loss_mask), length)
            out[rows] = view[starts[rows] - self._starts[shard]]
        for row in np.flatnonzero(~inside):  # the rare window that spans two shards
            out[row] = self.read(int(starts[row]), length, loss_mask)
        return out

    def read(self, start: int, length: int, loss_mask: bool = False) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across shard boundaries if needed."""
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        shard = int(np.searchsorted(self._starts, pos, side="right")) - 1
        while filled < length:
            values = self._array(shard, loss_mask)
            offset = pos - self._starts[shard]
            take = min(length - filled, len(values) - offset)
            out[filled:filled + take] = values[offset:offset + take]
            filled, pos, shard = filled + take, pos + take, shard + 1
        return out


def stride_mix(weights: np.ndarray, positions: np.ndarray, batch: int) -> np.ndarray:
    """The dataset of each of the next `batch` samples of a mixture (mixing "stride"), given the samples each
    dataset has given so far: dataset j's k-th sample is due at virtual time (k + 1) / w_j, and the global
    sequence takes samples in order of due time (ties: the lower index); the batch is the `batch` earliest
    due samples not yet given, from one sort of datasets x batch candidates (vectorised)."""
    due = (positions[:, None] + np.arange(1, batch + 1)[None, :]) / weights[:, None]
    order = np.argsort(due.ravel(), kind="stable")[:batch]  # row-major: ties go to the lower dataset
    return (order // batch).astype(np.int64)


# The rules a loader state can name, by the name it records: how an epoch's order is computed, and how a
# mixture assigns global sample positions to datasets. Today's are the first; the others are the rules of
# runs that began before them, kept with the upgrade of their states (data_pipeline/upgrade.py).
ORDERS = {FeistelOrder.name: FeistelOrder, MaterialisedOrder.name: MaterialisedOrder}
MIXING = {"stride": stride_mix, "deficit": deficit_mix}


class SampleStream:
    """One dataset's endless sequence of window ids: position p -> sample id, a pure function."""

    def __init__(self, store: TokenStore, seq_len: int, seed: int, shuffle: bool = True):
        self.store, self.seq_len, self.seed, self.shuffle = store, seq_len, seed, shuffle
        self.num_samples = (store.num_tokens - 1) // seq_len
        if self.num_samples < 1:
            raise DataError(f"split {store.split!r} of {store.data_dir} has {store.num_tokens} tokens: "
                            f"too few for one window of {seq_len + 1} (data.seq_len + 1)")
        self.set_order(FeistelOrder.name)

    def set_order(self, order: str) -> None:
        """The epoch order of ORDERS named `order` (without shuffling, positions are ids in any order)."""
        self.order = order
        self._order = (ORDERS[order] if self.shuffle else SequentialOrder)(self.num_samples, self.seed,
                                                                           self.store.fingerprint)

    def sample_ids(self, start: int, count: int) -> np.ndarray:
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_samples)
        if epochs[0] == epochs[-1]:  # the usual case: within one epoch
            return self._order(int(epochs[0]), offsets)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._order(int(epoch), offsets[sel])
        return out

    def windows(self, sample_ids: np.ndarray, loss_mask: bool = False) -> np.ndarray:
        if loss_mask and not self.store.has_loss_mask:
            return np.ones((len(sample_ids), self.seq_len + 1), dtype=np.int64)
        return self.store.windows(sample_ids * self.seq_len, self.seq_len + 1, loss_mask)


def document_position_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Positions that restart at 0 after every EOS: (batch, seq) -> (batch, seq)."""
    t = tokens.shape[-1]
    starts = np.zeros(tokens.shape, dtype=bool)
    starts[..., 0] = True
    starts[..., 1:] = tokens[..., :-1] == eos_id
    index = np.where(starts, np.arange(t), 0)
    return np.arange(t) - np.maximum.accumulate(index, axis=-1)


class PackedLoader:
    """Yields this rank's slice of each global batch as {"input_ids", "labels"} of shape
    (global_batch_size / dp_size, seq_len) (views of one (batch, seq_len + 1) tensor), the sample ids as
    "sample_ids" (dataset, id), and with document_positions "position_ids" restarting after each EOS."""

    def __init__(self, stores: TokenStore | list[TokenStore], seq_len: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True,
                 weights: list[float] | None = None, num_workers: int = 0, document_positions: bool = True):
        stores = [stores] if isinstance(stores, TokenStore) else list(stores)
        weights = weights or [1.0] * len(stores)
        if len(weights) != len(stores):
            raise ValueError(f"{len(stores)} datasets but {len(weights)} weights")
        if global_batch_size % dp_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {dp_size} data-parallel ranks")
        self.streams = [SampleStream(s, seq_len, seed, shuffle) for s in stores]
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.seq_len, self.seed, self.global_batch_size = seq_len, seed, global_batch_size
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.document_positions = document_positions
        self._set_rules(FeistelOrder.name, "stride")  # a loaded state may name others (load_state_dict)
        self.eos_id = stores[0].eos_id
        # The state: global batches given out, and samples given out by each dataset.
        self.step = 0
        self.positions = np.zeros(len(stores), dtype=np.int64)
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="loader") if num_workers else None
        self._ahead: collections.deque[tuple[Future, int, np.ndarray]] = collections.deque()
        self._plan_step, self._plan_positions = 0, self.positions.copy()

    @property
    def store(self) -> TokenStore:
        return self.streams[0].store

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in one pass over the first dataset (for a single dataset: one epoch)."""
        return max(1, int(self.streams[0].num_samples / self.weights[0]) // self.global_batch_size)

    @property
    def epoch(self) -> int:
        return int(self.positions[0] // self.streams[0].num_samples)

    @property
    def epoch_progress(self) -> float:
        """Epochs of the first (or only) dataset consumed so far, fractional."""
        return float(self.positions[0] / self.streams[0].num_samples)

    # -- planning: which samples make up the next global batch (cheap, sequential) --

    def _set_rules(self, order: str, mixing: str) -> None:
        """The epoch order (ORDERS) and mixing rule (MIXING) named by a loader state."""
        if order not in ORDERS:
            raise DataError(f"loader order {order!r} in the checkpoint is not one of {', '.join(ORDERS)}")
        if mixing not in MIXING:
            raise DataError(f"loader mixing {mixing!r} in the checkpoint is not one of {', '.join(MIXING)}")
        for stream in self.streams:
            stream.set_order(order)
        self.order, self.mixing, self._mix_rule = order, mixing, MIXING[mixing]

    def _mix(self, positions: np.ndarray) -> np.ndarray:
        """The dataset of each sample of the next global batch, given the samples each has given so far
        (the loader's mixing rule: stride_mix, or the rule an upgraded state names)."""
        if len(self.streams) == 1:
            return np.zeros(self.global_batch_size, dtype=np.int64)
        return self._mix_rule(self.weights, positions, self.global_batch_size)

    def _plan(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dataset of each sample, sample id of each, positions after the batch) for the next global batch."""
        positions = positions.copy()
        datasets = self._mix(positions)
        ids = np.empty(self.global_batch_size, dtype=np.int64)
        for j, stream in enumerate(self.streams):
            sel = datasets == j
            ids[sel] = stream.sample_ids(int(positions[j]), int(sel.sum()))
            positions[j] += int(sel.sum())
        return datasets, ids, positions

    # -- reading this rank's slice (the heavy part: may run in worker threads) --

    def _gather(self, datasets: np.ndarray, ids: np.ndarray, loss_mask: bool = False) -> np.ndarray:
        if len(self.streams) == 1:
            return self.streams[0].windows(ids, loss_mask)
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        for j, stream in enumerate(self.streams):
            rows = np.flatnonzero(datasets == j)
            out[rows] = stream.windows(ids[rows], loss_mask)
        return out

    def _read(self, datasets: np.ndarray, ids: np.ndarray) -> dict[str, torch.Tensor]:
        per_rank = self.global_batch_size // self.dp_size
        lo, hi = self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank
        datasets, ids = datasets[lo:hi], ids[lo:hi]
        windows = self._gather(datasets, ids)
        tokens = torch.from_numpy(windows)
        labels = tokens[:, 1:]
        if any(s.store.has_loss_mask for s in self.streams):
            # Only tokens with loss weight 1 (chat responses) are targets; prompts are context.
            labels = labels.masked_fill(torch.from_numpy(self._gather(datasets, ids, loss_mask=True)[:, 1:] == 0),
                                        IGNORE_INDEX)
        batch = {"input_ids": tokens[:, :-1], "labels": labels,
                 "sample_ids": torch.from_numpy(np.stack([datasets, ids], axis=1))}
        if self.document_positions:
            batch["position_ids"] = torch.from_numpy(document_position_ids(windows[:, :-1], self.eos_id))
        return batch

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._pool is None:
            datasets, ids, self.positions = self._plan(self.positions)
            self.step += 1
            return self._read(datasets, ids)
        # Keep num_workers batches in flight; the state advances only when a batch is handed out.
        while len(self._ahead) < self.num_workers + 1:
            datasets, ids, self._plan_positions = self._plan(self._plan_positions)
            self._plan_step += 1
            future = self._pool.submit(self._read, datasets, ids)
            self._ahead.append((future, self._plan_step, self._plan_positions.copy()))
        future, self.step, self.positions = self._ahead.popleft()
        return future.result()

    def skip(self, steps: int) -> None:
        """Advance by `steps` global batches without reading them (planning only)."""
        self._drain()
        for _ in range(steps):
            self.positions = self._plan(self.positions)[2]
            self.step += 1
        self._plan_step, self._plan_positions = self.step, self.positions.copy()

    def state_dict(self) -> dict:
        return {"version": LOADER_STATE_VERSION, "step": self.step, "positions": self.positions.tolist(),
                "seed": self.seed, "fingerprints": [s.store.fingerprint for s in self.streams],
                "weights": self.weights.tolist(), "seq_len": self.seq_len, "epoch": self.epoch, "order": self.order,
                "mixing": self.mixing, "consumed_samples": int(self.positions[0] % self.streams[0].num_samples)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (state_dict's, or an earlier commit's, upgraded first); DataError if it was
        counted on other data or settings."""
        state = upgrade_loader_state(state)
        mine = [s.store.fingerprint for s in self.streams]
        if state["fingerprints"] != mine:
            raise DataError(f"data changed since the checkpoint: fingerprints {state['fingerprints']} in the "
                            f"checkpoint, {mine} in {[str(s.store.data_dir) for s in self.streams]}")
        for key, setting in (("seed", "train.seed"), ("seq_len", "data.seq_len")):
            if state[key] != getattr(self, key):
                raise DataError(f"loader {key} changed since the checkpoint ({setting}): {state[key]} -> "
                                f"{getattr(self, key)}")
        if not np.allclose(state["weights"], self.weights):
            raise DataError(f"mixture weights (data.mixture) changed since the checkpoint: {state['weights']} -> "
                            f"{self.weights.tolist()}")
        self._drain()
        self._set_rules(state["order"], state["mixing"])
        self.step, self.positions = int(state["step"]), np.asarray(state["positions"], dtype=np.int64)
        self._plan_step, self._plan_positions = self.step, self.positions.copy()

    def _drain(self) -> None:
        for future, _, _ in self._ahead:
            future.cancel()
        self._ahead.clear()

    def close(self) -> None:
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
