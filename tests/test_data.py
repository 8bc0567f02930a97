"""Data pipeline: prepare writes complete shards and a manifest; the loader's order is deterministic,
covers the split once per epoch, is sliced across ranks, and resumes on another data-parallel size."""

import json

import numpy as np
import pytest

from data_pipeline.loader import PackedLoader, TokenStore
from data_pipeline.prepare import prepare, split_of
from data_pipeline.shards import read_manifest
from data_pipeline.tokenizer import Tokenizer
from megacore.config import DataConfig
from tests.conftest import megacore


def test_prepare_writes_manifest_shards_and_tokenizer(data_dir):
    manifest = read_manifest(data_dir)
    assert set(manifest["splits"]) == {"train", "val"}
    for split, info in manifest["splits"].items():
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


def test_split_is_by_content_and_independent_of_order():
    docs = [f"document number {i}" for i in range(2000)]
    forward = {d: split_of(d, 0.1) for d in docs}
    backward = {d: split_of(d, 0.1) for d in reversed(docs)}
    assert forward == backward
    assert 100 < sum(s == "val" for s in forward.values()) < 300


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


def _epoch_ids(store, dp_size, gbs=12, seq_len=64):
    loaders = [PackedLoader(store, seq_len, gbs, r, dp_size, seed=7) for r in range(dp_size)]
    steps = loaders[0].batches_per_epoch
    batches = []
    for _ in range(steps):
        ids = loaders[0].global_batch_ids().copy()
        per_rank = [l.next_batch()["input_ids"] for l in loaders]
        batches.append((ids, torch_cat(per_rank)))
    return batches


def torch_cat(tensors):
    import torch
    return torch.cat(tensors)


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_each_sample_once_per_epoch_and_same_global_batches_for_any_dp(data_dir, dp_size):
    store = TokenStore(data_dir, "val")
    reference = _epoch_ids(store, 1)
    batches = _epoch_ids(store, dp_size)
    seen = np.concatenate([ids for ids, _ in batches])
    assert len(np.unique(seen)) == len(seen) == len(batches) * 12
    for (ref_ids, ref_tokens), (ids, tokens) in zip(reference, batches):
        assert np.array_equal(ref_ids, ids)
        assert (ref_tokens == tokens).all(), "ranks' slices must concatenate to the global batch"


def test_windows_are_consecutive_stream_tokens(data_dir):
    store = TokenStore(data_dir, "val")
    loader = PackedLoader(store, 64, 4, shuffle=False)
    batch = loader.next_batch()
    stream = store.read(0, 4 * 64 + 1)
    assert (batch["input_ids"].flatten().numpy() == stream[:-1]).all()
    assert (batch["labels"][0].numpy() == stream[1:65]).all()


def test_resume_mid_epoch_on_another_dp_size_continues_the_same_sequence(data_dir):
    store = TokenStore(data_dir, "val")
    straight = PackedLoader(store, 64, 8, seed=3)
    expected = [straight.next_batch()["input_ids"] for _ in range(10)]

    first = [PackedLoader(store, 64, 8, r, 2, seed=3) for r in range(2)]
    for _ in range(4):
        for l in first:
            l.next_batch()
    state = first[0].state_dict()
    assert state == first[1].state_dict()
    resumed = [PackedLoader(store, 64, 8, r, 4, seed=3) for r in range(4)]
    for l in resumed:
        l.load_state_dict(json.loads(json.dumps(state)))
    for step in range(4, 10):
        got = torch_cat([l.next_batch()["input_ids"] for l in resumed])
        assert (got == expected[step]).all()


def test_epochs_roll_over_with_a_new_order(data_dir):
    store = TokenStore(data_dir, "val")
    loader = PackedLoader(store, 64, 16, seed=1)
    first = loader.global_batch_ids().copy()
    for _ in range(loader.batches_per_epoch):
        loader.next_batch()
    assert loader.global_batch_ids() is not None and loader.epoch == 1
    assert not np.array_equal(first, loader.global_batch_ids())


def test_fingerprint_mismatch_on_resume_is_an_error(data_dir):
    loader = PackedLoader(TokenStore(data_dir, "val"), 64, 8)
    state = loader.state_dict() | {"fingerprint": "0123456789abcdef"}
    with pytest.raises(ValueError, match="fingerprint"):
        loader.load_state_dict(state)


def test_missing_data_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        TokenStore(tmp_path / "absent", "train")
