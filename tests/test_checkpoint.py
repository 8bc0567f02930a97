"""Checkpoints: verifiable and atomic, falling back past a corrupt one, resuming exactly (bitwise) and
onto other layouts and world sizes with the losses of an unchanged run."""

import hashlib
import json
import random
import shutil

import numpy as np
import pytest
import torch

from megacore.checkpoint.dcp import rng_state, set_rng_state
from megacore.checkpoint.store import list_checkpoints
from megacore.checkpoint.weights import load_trained
from tests.helpers import (
    REPO,
    assert_same_weights,
    megacore,
    popen_failure,
    rank_processes,
    read_metrics,
    tiny_run_args,
)

COMMON = ["train.steps=8", "checkpoint.every=4", "train.eval_every=100", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """An uninterrupted 8-step run on 2 FSDP ranks, and one stopped at step 4 (its checkpoint)."""
    root = tmp_path_factory.mktemp("ckpt")

    def args(name, *extra):
        return tiny_run_args(data_dir, root / name, *COMMON, *extra)

    megacore("train", *args("straight"), "--nproc", "2")
    megacore("train", *args("half", "train.stop_after=4"), "--nproc", "2")
    return root, args


def test_resume_is_bitwise_exact(runs):
    root, args = runs
    shutil.copytree(root / "half", root / "same")
    # Starting again without --resume would overwrite the checkpoints: refused before any process starts.
    refused = megacore("train", *args("same"), "--nproc", "2", check=False)
    assert refused.returncode == 2 and "--resume auto" in refused.stderr
    megacore("train", *args("same"), "--resume", "auto", "--nproc", "2")
    assert_same_weights(root / "straight", root / "same", "parameters after stop + resume equal the uninterrupted run")
    straight, same = read_metrics(root / "straight"), read_metrics(root / "same")
    assert [same[s]["loss"] for s in range(1, 9)] == [straight[s]["loss"] for s in range(1, 9)]


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_resume_with_dropout_is_bitwise_exact(tmp_path, data_dir, checkpointing):
    # Dropout draws from torch's generator every step: the checkpoint's random streams carry it across,
    # also when activation checkpointing recomputes the masks in the backward pass.
    def run(name, *extra):
        return megacore("train", *tiny_run_args(data_dir, tmp_path / name, *COMMON, "model.dropout=0.1",
                                                "train.steps=6", "checkpoint.every=3",
                                                f"parallel.activation_checkpointing={checkpointing}", *extra))

    run("straight")
    run("resumed", "train.stop_after=3")
    run("resumed", "--resume", "auto")
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.parametrize("name, nproc, layout", [
    ("to_one_rank", 1, []),
    ("to_tp2", 2, ["parallel.tp=2"]),
    ("to_four_ranks", 4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    ("to_pp2", 2, ["parallel.pp=2"]),
])
def test_resume_on_another_layout_continues_the_same_losses(runs, name, nproc, layout):
    root, args = runs
    shutil.copytree(root / "half", root / name)
    megacore("train", *args(name, *layout), "--resume", "auto", "--nproc", str(nproc))
    straight, resumed = read_metrics(root / "straight"), read_metrics(root / name)
    for step in range(5, 9):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5), (name, step)


def test_corrupt_newest_checkpoint_is_skipped_saying_so(runs):
    root, args = runs
    shutil.copytree(root / "straight", root / "corrupt")
    newest = list_checkpoints(root / "corrupt")[-1]
    shard = sorted(newest.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = megacore("checkpoints", "verify", root / "corrupt", check=False)
    assert proc.returncode == 2 and shard.name in proc.stdout + proc.stderr
    explicit = megacore("eval", newest, check=False)
    assert explicit.returncode == 2 and "sha256" in explicit.stderr
    # Resume falls back to step 4 and trains steps 5-8 again, as in the uninterrupted run.
    proc = megacore("train", *args("corrupt"), "--resume", "auto", "--nproc", "2")
    assert f"skipping checkpoint {newest.name}" in proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    assert read_metrics(root / "corrupt")[8]["loss"] == read_metrics(root / "straight")[8]["loss"]


def test_crash_during_save_leaves_the_previous_checkpoint_newest(runs):
    root, args = runs
    shutil.copytree(root / "half", root / "crashed")
    ckpts = root / "crashed" / "checkpoints"
    # What a crash can leave: a temporary directory, and a renamed one whose manifest never landed.
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000008.tmp")
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000006")
    (ckpts / "step_00000006" / "manifest.json").unlink()
    assert [p.name for p in list_checkpoints(root / "crashed")] == ["step_00000004"]
    proc = megacore("train", *args("crashed"), "--resume", "auto", "--nproc", "2")
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    assert not (ckpts / "step_00000008.tmp").exists()
    assert not (ckpts / "latest").exists(), "the pointer earlier versions wrote (and nothing read) is gone"
    assert megacore("checkpoints", "verify", root / "crashed").returncode == 0


def test_checkpoint_holds_manifest_rng_and_meta(runs):
    root, _ = runs
    ckpt = list_checkpoints(root / "straight")[-1]
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"meta.json", "rng/rank_00000.json", "rng/rank_00001.json"} <= set(manifest)
    assert any(name.endswith(".distcp") for name in manifest)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 8 and meta["world_size"] == 2 and "loader" in meta and "config" in meta
    assert meta["tokenizer_sha256"] == hashlib.sha256((root / "straight" / "tokenizer.model").read_bytes()).hexdigest()
    out = megacore("checkpoints", "list", root / "straight").stdout
    assert "step_00000004" in out and "step_00000008" in out


def test_retention_keeps_last_k_and_every_mth(tiny_args, tmp_path):
    megacore("train", *tiny_args("keep", "train.steps=10", "checkpoint.every=1", "checkpoint.keep_last=2",
                                 "checkpoint.keep_every=4", "train.eval_every=100"))
    assert [p.name for p in list_checkpoints(tmp_path / "keep")] == [
        "step_00000004", "step_00000008", "step_00000009", "step_00000010"]


def test_rng_streams_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_hf_export_gives_our_logits_in_transformers_and_imports_back(runs, tmp_path, tiny_args, data_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megacore.checkpoint.hf import load_hf_into
    from megacore.model import Llama

    root, _ = runs
    out = tmp_path / "hf"
    megacore("export-hf", root / "straight", out)
    ours, tokenizer, cfg, _ = load_trained(root / "straight")
    theirs = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("ROMEO.\nBut soft, what light through yonder window breaks?")])
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-4)
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "KING.\n  What, ho!  床前明月光"
    assert hf_tok(text, add_special_tokens=False).input_ids == tokenizer.encode(text)
    assert hf_tok.decode(tokenizer.encode(text)) == text

    # And back: a model initialised from the directory is the same model, bit for bit.
    again = Llama(cfg.model)
    load_hf_into(again, out)
    assert_same_weights(again.state_dict(), ours.state_dict(), "imported back bit for bit")
    proc = megacore("train", *tiny_args("from_hf", "train.steps=2", "train.eval_every=1", f"train.init_from={out}"))
    assert "initialised weights from" in proc.stdout
    first_eval = read_metrics(tmp_path / "from_hf", "val")[1]["loss"]
    megacore("train", *tiny_args("fresh", "train.steps=2", "train.eval_every=1"))
    assert first_eval < read_metrics(tmp_path / "fresh", "val")[1]["loss"], "starts from the trained weights"


def test_kill_9_of_one_rank_restarts_the_group_which_resumes_exactly(runs, tmp_path):
    import subprocess
    import sys
    import time

    root, args = runs
    extra = ["train.steps=30", "checkpoint.every=10", "checkpoint.keep_last=2"]
    megacore("train", *args("long_straight", *extra), "--nproc", "2")
    run = root / "long_killed"
    # One restart allowed: the restarted group must connect first time (megacore.distributed keeps
    # each attempt's store keys apart; without that it read the dead group's addresses).
    cmd = [sys.executable, "-m", "megacore", "train", *args("long_killed", *extra), "--nproc", "2",
           "--max-restarts", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and proc.poll() is None:
        if _last_logged_step(run) >= 13:
            workers = rank_processes(proc.pid)
            if len(workers) == 2:
                victim = workers[1]
                victim.kill()  # SIGKILL, mid-run
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=600)
    assert victim is not None, "the run ended before a rank could be killed"
    assert proc.returncode == 0, popen_failure(proc, out)
    assert "resumed from" in out
    assert_same_weights(root / "long_straight", run, "after the restart the run ends where an undisturbed one does")
    # The steps the dead group logged after its last checkpoint are not in metrics.jsonl twice.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 31))
    assert json.loads((list_checkpoints(run)[-1] / "meta.json").read_text())["loader"] == \
        json.loads((list_checkpoints(root / "long_straight")[-1] / "meta.json").read_text())["loader"]


def test_async_save_commits_the_same_checkpoints(runs):
    root, args = runs
    megacore("train", *args("async", "checkpoint.async_save=true"), "--nproc", "2")
    assert [p.name for p in list_checkpoints(root / "async")] == ["step_00000004", "step_00000008"]
    assert megacore("checkpoints", "verify", root / "async").returncode == 0
    assert_same_weights(root / "straight", root / "async")
    # Resuming from the background-written step-4 checkpoint continues exactly.
    shutil.copytree(root / "async", root / "async_resume")
    shutil.rmtree(root / "async_resume" / "checkpoints" / "step_00000008")
    megacore("train", *args("async_resume"), "--resume", "auto", "--nproc", "2")
    assert_same_weights(root / "straight", root / "async_resume")


def _last_logged_step(run) -> int:
    """Newest step in metrics.jsonl while rank 0 may be mid-write: complete lines only."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    text = path.read_text()
    lines = text.splitlines()[:-1] if not text.endswith("\n") else text.splitlines()
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


def test_digests_taken_while_writing_are_the_files_sha256(tmp_path):
    """The manifest's sha256 of each DCP file comes from the bytes on their way to disk (no read-back);
    they equal the files' own, and a file written out of order is left to be hashed from disk."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from data_pipeline.shards import file_sha256
    from megacore.checkpoint.digests import _HashingStream, hashing_writer, streamed_digests

    writer = hashing_writer(tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"w": torch.randn(300, 70), "b": torch.arange(10)}, storage_writer=writer, no_dist=True)
    digests = streamed_digests(writer, tmp_path / "ckpt")
    assert digests and all(name.endswith(".distcp") for name in digests)
    for name, info in digests.items():
        assert info == {"bytes": (tmp_path / "ckpt" / name).stat().st_size,
                        "sha256": file_sha256(tmp_path / "ckpt" / name)}
    with open(tmp_path / "f", "wb") as f:
        stream = _HashingStream(f)
        stream.write(b"abc")
        stream.seek(0)
        assert not stream.sequential


def test_checkpoint_metadata_of_every_version_reads_and_a_newer_one_is_refused(tmp_path):
    """meta.json is versioned (megacore/checkpoint/meta.py): the fixture's version-1 file reads as today's,
    a key this code does not know survives a rewrite, and a newer version is refused naming the file."""
    import dataclasses

    from megacore.checkpoint.meta import META_VERSION, CheckpointMeta, read_meta
    from megacore.errors import CheckpointError

    old = REPO / "tests/fixtures/run_a02a75f/run/checkpoints/step_00000004"
    raw = json.loads((old / "meta.json").read_text())
    assert "version" not in raw and "health" not in raw
    meta = read_meta(old)
    assert (meta.version, meta.step, meta.world_size, meta.backend, meta.healthy) == (META_VERSION, 4, 2, "torch", True)
    assert meta.loader == raw["loader"] and meta.tokenizer_sha256 == raw["tokenizer_sha256"]

    later = {**meta.to_dict(), "written_by_a_later_commit": [1, 2]}
    again = CheckpointMeta.from_dict(later)
    assert dataclasses.replace(again, step=5).to_dict()["written_by_a_later_commit"] == [1, 2]

    (tmp_path / "meta.json").write_text(json.dumps({**later, "version": META_VERSION + 1}))
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'meta.json'}: meta.json version {META_VERSION + 1}"):
        read_meta(tmp_path)
