"""Checkpoints lose nothing and run nothing: retention keeps the checkpoint just written when a newer one
is corrupt, a rollback sets the newer line aside and logs each step once, and a pickle planted in a
checkpoint executes on no load path. Real `megacore` processes."""

import dataclasses
import io
import json
import pickle
import shutil

import pytest
import torch

from megacore.checkpoint.store import list_checkpoints
from tests.helpers import NO_EVAL, PlantedPayload, failure_message, flip_a_byte, megacore, rewrite_manifest, tiny_run_args

pytestmark = pytest.mark.processes


def _train_lines(run):
    """Every train record in metrics.jsonl, in file order (a step logged twice shows twice)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


# Retention and one line of history


def test_retention_keeps_the_checkpoint_just_written_when_a_newer_one_is_corrupt(tiny_args, tmp_path):
    args = tiny_args("run", "train.steps=8", "checkpoint.every=2", "checkpoint.keep_last=1", *NO_EVAL)
    megacore("train", *args)
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    flip_a_byte(sorted((ckpts / "step_00000008").glob("*.distcp"))[0])
    proc = megacore("train", *args, "--resume", "auto", "train.stop_after=6")
    assert "skipping checkpoint step_00000008" in proc.stdout + proc.stderr
    assert "saved checkpoint" in proc.stdout and "step_00000006" in proc.stdout
    assert [p.name for p in list_checkpoints(run)] == ["step_00000006"], "the newest good checkpoint survives"
    assert megacore("checkpoints", "verify", run).returncode == 0
    # The corrupt one is kept aside, not deleted, and cannot shadow the new line.
    assert [p.name.split(".")[0] for p in (ckpts / "abandoned").iterdir()] == ["step_00000008"]
    assert not (ckpts / "latest").exists(), "no pointer that nothing reads"


def test_ranks_verify_a_checkpoint_together_and_all_skip_or_refuse_what_one_of_them_found(tiny_args, tmp_path):
    """On 2 ranks each hashes half the files of a candidate; a file only rank 1 reads is found bad, and both
    take the older checkpoint (auto), or both stop naming the file (an explicit checkpoint), none hangs."""
    import json as json_

    args = tiny_args("run", "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=0", *NO_EVAL)
    megacore("train", *args, "--nproc", "2")
    newest = tmp_path / "run" / "checkpoints" / "step_00000004"
    files = sorted(json_.loads((newest / "manifest.json").read_text())["files"])
    victim = files[1]  # rank 1's share: files 1, 3, 5, ...
    flip_a_byte(newest / victim)
    proc = megacore("train", *args, "--nproc", "2", "--resume", str(newest), check=False)
    assert proc.returncode == 2 and f"{newest / victim}: sha256 mismatch (altered)" in proc.stderr, proc.stderr
    proc = megacore("train", *args, "--nproc", "2", "--resume", "auto")
    assert f"skipping checkpoint step_00000004: {newest / victim}: sha256 mismatch" in proc.stdout
    assert "resumed from" in proc.stdout and "step_00000002 at step 2" in proc.stdout


def test_a_rollback_sets_newer_checkpoints_aside_and_each_step_is_logged_once(tiny_args, tmp_path):
    args = tiny_args("run", "train.steps=8", "checkpoint.every=2", "checkpoint.keep_last=0", *NO_EVAL)
    megacore("train", *args)
    run = tmp_path / "run"
    proc = megacore("train", *args, "--resume", run / "checkpoints" / "step_00000004", "train.stop_after=6")
    assert "moved step_00000006 aside" in proc.stdout and "moved step_00000008 aside" in proc.stdout
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert _train_lines(run) == list(range(1, 7)), "the rolled-back steps are not in metrics.jsonl twice"
    # A later --resume auto follows the new line, not the abandoned step 8.
    proc = megacore("train", *args, "--resume", "auto")
    assert "resumed from" in proc.stdout and "step_00000006 at step 6" in proc.stdout
    assert _train_lines(run) == list(range(1, 9))
    superseded = [json.loads(line)["step"] for line in (run / "metrics.superseded.jsonl").read_text().splitlines()]
    assert {5, 6, 7, 8} <= set(superseded), "the dead line's records are kept aside"


# Loading a checkpoint executes nothing


def test_a_pickle_planted_in_dcp_metadata_runs_on_no_load_path(small_run, data_dir, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(small_run, run)
    ckpt = list_checkpoints(run)[-1]
    (ckpt / ".metadata").write_bytes(pickle.dumps(PlantedPayload(marker)))
    rewrite_manifest(ckpt)
    assert megacore("checkpoints", "verify", run).returncode == 0
    for args in (["eval", run, "--batches", "1"], ["generate", run, "--max-new-tokens", "2"],
                 ["export-hf", run, tmp_path / "hf"], ["checkpoints", "consolidate", run, tmp_path / "weights"],
                 ["train", *tiny_run_args(data_dir, run, "train.steps=4", *NO_EVAL), "--resume", "auto"],
                 ["train", *tiny_run_args(data_dir, tmp_path / "new", f"train.init_from={run}", *NO_EVAL)]):
        proc = megacore(*args, check=False)
        assert proc.returncode == 2, failure_message(proc)
        assert "refused to load posix.system" in proc.stderr and str(ckpt / ".metadata") in proc.stderr, args
    assert not marker.exists(), "nothing in the checkpoint ran"


def test_a_pickle_planted_among_dcp_entries_runs_nothing_on_resume(small_run, data_dir, tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    run, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(small_run, run)
    ckpt = list_checkpoints(run)[-1]
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # our own test file: trusted here
    index = next(i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    info = metadata.storage_data[index]
    payload = io.BytesIO()
    torch.save(PlantedPayload(marker), payload)
    target = ckpt / info.relative_path
    offset = target.stat().st_size
    with open(target, "ab") as f:
        f.write(payload.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    rewrite_manifest(ckpt)
    proc = megacore("train", *tiny_run_args(data_dir, run, "train.steps=4", *NO_EVAL), "--resume", "auto", check=False)
    assert proc.returncode == 2 and f"refused to load the entry {index.fqn}" in proc.stderr, failure_message(proc)
    assert not marker.exists()
