"""What training refuses of its data, naming the file or the value: an altered shard (every rank stops
with one message), a token id beyond the vocabulary, data changed since the checkpoint (prepared again,
then refused on resume) and data of another tokenizer (init_from and eval). Real `megacore` processes."""

import json

import numpy as np
import pytest

from data_pipeline.shards import read_manifest, write_shard
from megacore.checkpoint.store import list_checkpoints
from tests.helpers import NO_EVAL, failure_message, flip_a_byte, megacore, synthetic_docs, tiny_run_args

pytestmark = pytest.mark.processes


# The loader verifies shards


def test_an_altered_shard_stops_every_rank_with_one_message_naming_it(prepared_copy, tiny_args):
    shard = prepared_copy / read_manifest(prepared_copy)["splits"]["train"]["shards"][0]["file"]
    flip_a_byte(shard)
    proc = megacore("train", *tiny_args("run", f"data.dir={prepared_copy}", "train.steps=2"), "--nproc", "2",
                    check=False)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("megacore: error:")]
    assert proc.returncode == 2 and len(errors) == 1, failure_message(proc)
    assert str(shard) in errors[0] and "sha256" in errors[0]


def test_a_token_id_beyond_the_vocabulary_is_refused_naming_the_shard(prepared_copy, tiny_args):
    manifest = read_manifest(prepared_copy)
    record = manifest["splits"]["train"]["shards"][0]
    shard = prepared_copy / record["file"]
    vocab = manifest["tokenizer"]["vocab_size"]
    values = np.full(record["tokens"], 5, dtype=np.uint16)
    values[7] = vocab  # one id the embedding does not have
    manifest["splits"]["train"]["shards"][0] = write_shard(shard, values, np.array([record["tokens"]]))
    (prepared_copy / "manifest.json").write_text(json.dumps(manifest))
    proc = megacore("train", *tiny_args("run", f"data.dir={prepared_copy}", "train.steps=2"), check=False)
    assert proc.returncode == 2 and f"token id {vocab}" in proc.stderr and str(shard) in proc.stderr
    assert "Traceback" not in proc.stderr


# A changed source is prepared again, and a checkpoint of the old data refuses the new


def test_a_changed_source_is_prepared_again_and_the_old_checkpoint_refuses_it(tmp_path):
    source, data = tmp_path / "in.jsonl", tmp_path / "data"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_docs(400, 1)))
    prep = ["data", "prepare", "configs/tiny.yaml", f"data.dir={data}", f"data.sources=[{source}]", "data.vocab_size=400"]
    megacore(*prep)
    before = read_manifest(data)["fingerprint"]
    assert "already prepared" in megacore(*prep).stdout
    train = ["train", "configs/tiny.yaml", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
             "data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=4", "train.peak_tflops=0.1",
             f"data.dir={data}", f"train.run_dir={tmp_path / 'run'}", "train.steps=4", "train.stop_after=2",
             "checkpoint.every=2", "train.eval_batches=1", *NO_EVAL]
    megacore(*train)
    with open(source, "a") as f:  # the same file, more records
        f.write("".join(json.dumps({"text": d}) + "\n" for d in synthetic_docs(100, 2)))
    out = megacore(*prep).stdout
    assert "sources changed" in out and "already prepared" not in out
    assert read_manifest(data)["fingerprint"] != before
    refused = megacore(*train, "--resume", "auto", check=False)
    assert refused.returncode == 2 and "the data changed since the checkpoint" in refused.stderr
    assert before in refused.stderr and "Traceback" not in refused.stderr


# Data of another tokenizer


@pytest.fixture(scope="module")
def other_tokenizer_data(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("other") / "data"
    source = out.parent / "in.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_docs(400, 5)))
    megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={out}", f"data.sources=[{source}]", "data.vocab_size=512")
    return out


def test_init_from_and_eval_refuse_data_of_another_tokenizer_naming_both(small_run, other_tokenizer_data, tmp_path):
    ours = read_manifest(other_tokenizer_data)["tokenizer"]["sha256"]
    theirs = json.loads((list_checkpoints(small_run)[-1] / "meta.json").read_text())["tokenizer_sha256"]
    proc = megacore("train", *tiny_run_args(other_tokenizer_data, tmp_path / "run", f"train.init_from={small_run}"),
                    check=False)
    assert proc.returncode == 2 and ours in proc.stderr and theirs in proc.stderr
    proc = megacore("eval", small_run, "--data-dir", other_tokenizer_data, check=False)
    assert proc.returncode == 2 and ours in proc.stderr and theirs in proc.stderr
