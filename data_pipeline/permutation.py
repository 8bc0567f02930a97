"""A keyed pseudo-random permutation of [0, n), evaluated on demand: position -> sample id; and the
loader's epoch order built on it (`FeistelOrder`).

The loader's epoch order used to be a materialised permutation of every sample id (8 bytes a sample:
about 4 GB per rank at 1T tokens, 58 GB at 15T). `FeistelPermutation` computes the id at any position
instead, in constant memory: a balanced Feistel network over the smallest even-bit power of two that
holds n (at most 4n), with cycle-walking to stay inside [0, n). A Feistel network is a bijection for
any round function, so every sample appears exactly once per epoch; six rounds of a splitmix64-style
mixer keyed by (seed, epoch, data fingerprint) give a well-shuffled order. Vectorised over numpy
arrays of positions; the cost per id is a few dozen integer operations, whatever n is.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN, _MUL1, _MUL2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a strong 64-bit mixing function (uint64 arithmetic wraps)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def permutation_key(*parts) -> int:
    """A 64-bit key from anything printable (seed, epoch, fingerprint)."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


class FeistelPermutation:
    ROUNDS = 6

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        keys, state = [], np.array([key], dtype=np.uint64)
        for _ in range(self.ROUNDS):
            state = _mix(state)
            keys.append(state[0])
        self.round_keys = keys

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at `positions` (each in [0, n))."""
        with np.errstate(over="ignore"):
            out = self._encrypt(np.asarray(positions, dtype=np.uint64))
            outside = out >= self.n
            while outside.any():  # cycle-walking: the domain holds at most 4n values
                out[outside] = self._encrypt(out[outside])
                outside = out >= self.n
        return out.astype(np.int64)


# Positions whose ids FeistelOrder computes together (512 KB of int64).
ORDER_BLOCK = 1 << 16


class FeistelOrder:
    """The loader's epoch order (a loader state's order "feistel"): position p of epoch e of a dataset is
    sample FeistelPermutation(num_samples, key(seed, e, fingerprint))(p). Batches take consecutive
    positions, so ids are computed a block of ORDER_BLOCK positions at a time (vectorised) and served from
    the last two blocks: memory stays bounded at any corpus size."""

    name = "feistel"

    def __init__(self, num_samples: int, seed: int, fingerprint: str):
        self.num_samples, self.seed, self.fingerprint = num_samples, seed, fingerprint
        self._epoch, self._permutation = -1, None
        self._blocks: dict[tuple[int, int], np.ndarray] = {}  # (epoch, block) -> ids, at most 2 kept

    def __call__(self, epoch: int, offsets: np.ndarray) -> np.ndarray:
        """Sample ids at `offsets` (positions within the epoch)."""
        first, last = int(offsets[0]) // ORDER_BLOCK, int(offsets[-1]) // ORDER_BLOCK
        if last - first > 1 or np.any(np.diff(offsets) != 1):
            return self.permutation(epoch)(offsets)
        ids = np.concatenate([self._block(epoch, b) for b in range(first, last + 1)])
        return ids[offsets - first * ORDER_BLOCK]

    def permutation(self, epoch: int) -> FeistelPermutation:
        if self._epoch != epoch:
            self._permutation = FeistelPermutation(self.num_samples, permutation_key(self.seed, epoch, self.fingerprint))
            self._epoch = epoch
        return self._permutation

    def _block(self, epoch: int, block: int) -> np.ndarray:
        if (epoch, block) not in self._blocks:
            if len(self._blocks) >= 2:
                self._blocks.pop(next(iter(self._blocks)))
            start = block * ORDER_BLOCK
            positions = np.arange(start, min(start + ORDER_BLOCK, self.num_samples), dtype=np.int64)
            self._blocks[epoch, block] = self.permutation(epoch)(positions)
        return self._blocks[epoch, block]


class SequentialOrder:
    """No shuffling (evaluation): position p of every epoch is sample p."""

    def __init__(self, num_samples: int, seed: int, fingerprint: str):
        pass

    def __call__(self, epoch: int, offsets: np.ndarray) -> np.ndarray:
        return offsets.astype(np.int64)
