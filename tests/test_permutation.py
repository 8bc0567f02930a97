"""The loader's epoch order at any corpus size: a keyed bijection evaluated on demand, in constant memory,
that every data-parallel split of a global batch agrees on; and the order of runs that predate it."""

import json
import time
import tracemalloc

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.loader import PackedLoader, SampleStream, TokenStore
from data_pipeline.permutation import FeistelPermutation, permutation_key
from data_pipeline.upgrade import LOADER_STATE_VERSION
from tests.helpers import REPO, megacore


@pytest.mark.parametrize("key", [0, 1, permutation_key(1234, 7, "0e63e3e473dbee42")])
def test_every_small_domain_is_permuted_exactly(key):
    for n in [*range(1, 300), 1024, 1025, 2**16 + 3]:
        ids = FeistelPermutation(n, key)(np.arange(n))
        assert np.array_equal(np.sort(ids), np.arange(n)), n


def test_orders_differ_by_epoch_and_look_shuffled():
    a = FeistelPermutation(10_000, permutation_key(1, 0, "f"))(np.arange(10_000))
    b = FeistelPermutation(10_000, permutation_key(1, 1, "f"))(np.arange(10_000))
    assert (a != b).mean() > 0.99
    assert abs(np.corrcoef(np.arange(10_000), a)[0, 1]) < 0.05


class _Store:
    """Just what the order needs of a split: its size and identity (no tokens are read here)."""

    def __init__(self, samples: int, seq_len: int):
        self.num_tokens, self.fingerprint = samples * seq_len + 1, "0e63e3e473dbee42"
        self.split, self.data_dir = "train", "x"


def _hundred_batches(samples: int) -> tuple[float, int]:
    tracemalloc.start()
    start = time.perf_counter()
    stream = SampleStream(_Store(samples, 2048), 2048, seed=1234)
    for b in range(100):
        ids = stream.sample_ids(b * 512, 512)
        assert ids.min() >= 0 and ids.max() < samples
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak


def test_five_billion_samples_cost_what_ten_thousand_do():
    small_s, small_bytes = _hundred_batches(10_000)
    big_s, big_bytes = _hundred_batches(5_000_000_000)  # about 10^13 tokens at seq 2048
    assert big_s - small_s < 1.0 and big_bytes - small_bytes < 4 * 2**20, (small_s, big_s, small_bytes, big_bytes)


def test_data_order_audits_agree_across_one_two_and_three_ranks(data_dir):
    def rows(dp_size):
        per_rank = []
        for rank in range(dp_size):
            out = megacore("data", "order", data_dir, "--dp-size", str(dp_size), "--dp-rank", str(rank),
                           "--global-batch", "12", "--steps", "3", "--start-step", "5", "--seq-len", "64", "--json")
            per_rank.append([json.loads(line)["sample_ids"] for line in out.stdout.splitlines()])
        return [sum((r[step] for r in per_rank), []) for step in range(3)]

    assert rows(1) == rows(2) == rows(3)


def test_a_loader_state_from_before_the_feistel_order_continues_in_its_own_order(data_dir):
    store = TokenStore(data_dir, "train")
    # A run that began before the Feistel order: its states name the order it began with.
    legacy = PackedLoader(store, 64, 8, seed=3)
    legacy.load_state_dict({**legacy.state_dict(), "order": "legacy"})
    legacy.skip(4)
    state = legacy.state_dict()
    for key in ("version", "order", "mixing"):
        del state[key]  # as earlier commits wrote it
    resumed = PackedLoader(store, 64, 8, seed=3)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["order"] == "legacy"
    assert resumed.state_dict()["version"] == LOADER_STATE_VERSION
    feistel = PackedLoader(store, 64, 8, seed=3)
    feistel.skip(4)
    # The legacy order is the materialised permutation earlier commits drew, not today's order.
    ids = np.random.default_rng([3, 0, int(store.fingerprint, 16)]).permutation((store.num_tokens - 1) // 64)
    for b in range(4, 7):
        batch = resumed.next_batch()["sample_ids"]
        assert np.array_equal(batch, legacy.next_batch()["sample_ids"])
        assert np.array_equal(batch[:, 1], ids[8 * b:8 * b + 8])
        assert not np.array_equal(batch, feistel.next_batch()["sample_ids"])
    fresh = PackedLoader(store, 64, 8, seed=3)
    fresh.load_state_dict({**fresh.state_dict(), "order": "legacy"})
    assert np.array_equal(fresh.next_batch()["sample_ids"][:, 1], ids[:8])


def test_the_loader_state_a_run_of_an_earlier_commit_saved_continues_its_own_order():
    """The loader state in tests/fixtures/run_a02a75f's checkpoint (no version, order or mixing key) is
    upgraded when loaded: the run continues in the materialised order it was trained with."""
    fixture = REPO / "tests" / "fixtures" / "run_a02a75f"
    state = json.loads((fixture / "run" / "checkpoints" / "step_00000004" / "meta.json").read_text())["loader"]
    assert not {"version", "order", "mixing"} & set(state)
    store = TokenStore(fixture / "data", "train")
    loader = PackedLoader(store, 32, 4, seed=1234)
    loader.load_state_dict(state)
    assert (loader.order, loader.mixing, loader.step) == ("legacy", "deficit", 4)
    ids = np.random.default_rng([1234, 0, int(store.fingerprint, 16)]).permutation((store.num_tokens - 1) // 32)
    for b in range(4, 6):
        assert np.array_equal(loader.next_batch()["sample_ids"][:, 1], ids[4 * b:4 * b + 4])
    assert {k: v for k, v in loader.state_dict().items() if k in ("version", "order", "mixing")} == {
        "version": LOADER_STATE_VERSION, "order": "legacy", "mixing": "deficit"}, "saved again as it continues"


def test_loader_states_of_a_newer_or_unknown_format_are_refused_by_name(data_dir):
    loader = PackedLoader(TokenStore(data_dir, "val"), 64, 8)
    with pytest.raises(DataError, match=f"unsupported version {LOADER_STATE_VERSION + 1}"):
        loader.load_state_dict({**loader.state_dict(), "version": LOADER_STATE_VERSION + 1})
    with pytest.raises(DataError, match="loader order 'zigzag' in the checkpoint is not one of feistel, legacy"):
        loader.load_state_dict({**loader.state_dict(), "order": "zigzag"})
    with pytest.raises(DataError, match="loader mixing 'random' in the checkpoint is not one of stride, deficit"):
        loader.load_state_dict({**loader.state_dict(), "mixing": "random"})


def test_ids_served_from_blocks_are_the_permutation_itself_across_block_and_epoch_edges():
    from data_pipeline.permutation import ORDER_BLOCK

    n = 3 * ORDER_BLOCK + 17
    stream = SampleStream(_Store(n, 8), 8, seed=5)
    for start in (0, ORDER_BLOCK - 10, 2 * ORDER_BLOCK - 1, n - 5, 7 * n - 3):
        expected = [FeistelPermutation(n, permutation_key(5, (start + i) // n, "0e63e3e473dbee42"))(
            np.array([(start + i) % n]))[0] for i in range(20)]
        assert stream.sample_ids(start, 20).tolist() == expected, start
