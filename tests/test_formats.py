"""Formats are promises: a data directory and a run directory with checkpoints written by an earlier
commit (tests/fixtures/run_a02a75f, made before the package reshape) keep loading and resume exactly."""

import json
import shutil

import pytest

from tests.helpers import REPO, megacore, read_metrics

FIXTURE = REPO / "tests" / "fixtures" / "run_a02a75f"
# The settings the fixture was trained with (its README).
SHAPE = ["model.dim=16", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "data.seq_len=32",
         "model.max_seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2", "optim.warmup_steps=1",
         "logging.log_every=1", "train.eval_batches=1", "train.eval_every=2", "train.peak_tflops=0.1",
         "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=1"]


@pytest.fixture
def old_run(tmp_path):
    shutil.copytree(FIXTURE / "data", tmp_path / "data")
    shutil.copytree(FIXTURE / "run", tmp_path / "run")
    return tmp_path / "data", tmp_path / "run"


def test_old_run_resumes_with_the_losses_of_its_uninterrupted_run(old_run):
    data, run = old_run
    proc = megacore("train", "configs/tiny.yaml", *SHAPE, f"data.dir={data}", f"train.run_dir={run}",
                    "--resume", "auto", "--nproc", "2")
    assert "resumed from" in proc.stdout and "step_00000004 at step 4" in proc.stdout
    expected = json.loads((FIXTURE / "expected.json").read_text())["uninterrupted_train"]
    train = read_metrics(run)
    for step in (5, 6):
        assert train[step]["loss"] == pytest.approx(expected[str(step)]["loss"], rel=1e-6), step
        assert train[step]["grad_norm"] == pytest.approx(expected[str(step)]["grad_norm"], rel=1e-5), step


def test_old_checkpoint_verifies_and_evaluates(old_run):
    data, run = old_run
    assert "ok" in megacore("checkpoints", "verify", run).stdout
    result = json.loads(megacore("eval", run, "--data-dir", data, "--batches", "1").stdout.splitlines()[-1])
    assert result["tokens"] > 0 and result["loss"] > 0
    assert "tokenizer vocab 400" in megacore("data", "inspect", data).stdout


def test_preparing_the_same_source_again_gives_the_same_dataset(tmp_path):
    # Same source and settings, today's code: the same tokenizer bytes and shards, hence the same
    # fingerprint, so the sample order (seeded by it) and old checkpoints stay valid.
    megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={tmp_path / 'data'}",
             f"data.sources=[{FIXTURE / 'hamlet.txt'}]", "data.vocab_size=400")
    old = json.loads((FIXTURE / "data" / "manifest.json").read_text())
    new = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert new["tokenizer"]["sha256"] == old["tokenizer"]["sha256"]
    assert new["fingerprint"] == old["fingerprint"]


def test_data_prepared_before_the_coverage_could_be_left_unset_is_still_up_to_date(prepared_copy):
    # What a version-1 manifest and tokenizer sidecar recorded: sentencepiece's 0.9995 (or no key at all).
    from tests.helpers import PLAYS_URL

    manifest = json.loads((prepared_copy / "manifest.json").read_text())
    manifest["version"], manifest["settings"]["character_coverage"] = 1, 0.9995
    (prepared_copy / "manifest.json").write_text(json.dumps(manifest))
    sidecar = json.loads((prepared_copy / "tokenizer.json").read_text())
    del sidecar["version"], sidecar["settings"]["character_coverage"]
    (prepared_copy / "tokenizer.json").write_text(json.dumps(sidecar))
    out = megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={prepared_copy}", f"data.sources=[{PLAYS_URL}]",
                   "data.vocab_size=512").stdout
    assert "already prepared" in out, out
    (prepared_copy / "manifest.json").unlink()  # (the shards then the tokenizer are checked, not the manifest)
    out = megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={prepared_copy}", f"data.sources=[{PLAYS_URL}]",
                   "data.vocab_size=512").stdout
    assert "reusing" in out and "trained" not in out, out
