"""Data, checkpoints and models in object storage (s3:// URLs), against a real S3 API on loopback: moto's
server with IAM authentication (tests/s3_server.py), read and written through s3fs as on AWS."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import psutil
import pytest
import torch

from tests.helpers import (
    NO_EVAL,
    PLAYS_URL,
    REPO,
    TINY,
    assert_same_weights,
    failure_message,
    megacore,
    require_processes_marker,
    trained_weights,
)

pytestmark = pytest.mark.processes
STEPS = ["train.steps=6", "checkpoint.every=2"]


def bucket_files(url: str) -> dict[str, int]:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    root = url.removeprefix("s3://")
    return {name[len(root):].lstrip("/"): info["size"] for name, info in fs.find(root, detail=True).items()}


def store_args(data: str, run_dir: Path, *extra: str) -> list[str]:
    return ["configs/tiny.yaml", *TINY, *NO_EVAL, f"data.dir={data}", f"train.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def bucket_data(s3, tmp_path_factory) -> str:
    """The plays prepared straight into a bucket by `megacore data prepare` (what data_dir holds locally)."""
    import uuid

    name = f"data-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3").mkdir(name)
    proc = megacore("data", "prepare", "configs/tiny.yaml", f"data.dir=s3://{name}/shakespeare",
                    f"data.sources=[{PLAYS_URL}]", "data.vocab_size=512")
    assert f"uploaded s3://{name}/shakespeare (manifest last)" in proc.stdout
    return f"s3://{name}/shakespeare"


def test_a_run_on_bucket_data_with_bucket_checkpoints_resumes_on_an_empty_node_bit_for_bit(
        s3, bucket, bucket_data, data_dir, tmp_path):
    from data_pipeline.shards import read_manifest

    assert read_manifest(bucket_data)["fingerprint"] == read_manifest(data_dir)["fingerprint"]
    names = bucket_files(bucket_data)
    assert "manifest.json" in names and any(n.endswith(".arrow") for n in names)

    ckpts = f"{bucket}/checkpoints"
    first = tmp_path / "node-a"
    proc = megacore("train", *store_args(bucket_data, first / "run", *STEPS, f"checkpoint.dir={ckpts}",
                                         f"data.cache_dir={first / 'cache'}", "train.stop_after=4"), "--nproc", "2")
    assert f"saved checkpoint {ckpts}/step_00000004" in proc.stdout
    assert not (first / "run" / "checkpoints").exists() or not list((first / "run" / "checkpoints").iterdir())
    assert sorted(os.listdir(first / "cache")) and all(n.endswith(".arrow") for n in os.listdir(first / "cache"))
    shutil.rmtree(first)  # the node is gone: no run directory, no shard cache

    second = tmp_path / "node-b"
    proc = megacore("train", *store_args(bucket_data, second / "run", *STEPS, f"checkpoint.dir={ckpts}",
                                         f"data.cache_dir={second / 'cache'}", "logging.wandb_mode=offline",
                                         "checkpoint.async_save=true"),
                    "--nproc", "2", "--resume", "auto")
    assert f"resumed from {ckpts}/step_00000004 at step 4" in proc.stdout
    assert f"saved checkpoint {ckpts}/step_00000006 (written in the background)" in proc.stdout
    assert megacore("checkpoints", "verify", ckpts).stdout.count(" ok") == 2
    files = bucket_files(ckpts)
    assert {"step_00000004/manifest.json", "step_00000006/manifest.json", "step_00000006/run/config.yaml",
            "step_00000006/run/tokenizer.model", "step_00000006/rng/rank_00001.json"} <= set(files)
    assert not any(f.startswith("step_00000002/") for f in files)  # retention (keep_last=2) in the bucket

    reference = tmp_path / "local"
    megacore("train", *store_args(str(data_dir), reference, *STEPS), "--nproc", "2")
    assert_same_weights(trained_weights(ckpts), reference, "the bucket run differs from the local one")

    # The checkpoint.dir alone serves eval and generate (no run directory anywhere).
    ev = json.loads(megacore("eval", ckpts, "--batches", "2").stdout)
    assert ev["checkpoint"] == f"{ckpts}/step_00000006" and ev["loss"] > 0
    assert megacore("generate", ckpts, "--prompt", "ROMEO.", "--max-new-tokens", "8").stdout.startswith("ROMEO.")

    # No secret in anything the run wrote: the run directory (W&B's offline files included) or the bucket.
    secret = s3.secret.encode()
    for path in (second / "run").rglob("*"):
        assert not path.is_file() or secret not in path.read_bytes(), path
    fs = fsspec.filesystem("s3")
    for prefix in (ckpts, bucket_data):
        for name in bucket_files(prefix):
            assert secret not in fs.cat(f"{prefix.removeprefix('s3://')}/{name}"), name


def _rank0(launcher: subprocess.Popen) -> psutil.Process | None:
    for proc in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if proc.environ().get("RANK") == "0" and "megacore" in " ".join(proc.cmdline()):
                return proc
        except psutil.Error:
            continue
    return None


def test_a_rank_killed_during_an_upload_leaves_a_checkpoint_that_nothing_chooses(s3, bucket, bucket_data, tmp_path):
    """Uploads go through a slow relay; rank 0 is killed (-9) while it uploads its shard of step 4, after
    step 2 committed. Resume, retention and export then take step 2, never the half-written step 4."""
    from tests.s3_server import SlowRelay

    require_processes_marker("torchrun")
    relay = SlowRelay(int(s3.endpoint.rsplit(":", 1)[1]), delay=0.02)
    ckpts = f"{bucket}/checkpoints"
    args = store_args(bucket_data, tmp_path / "run", *STEPS, f"checkpoint.dir={ckpts}", "model.dim=128",
                      f"data.cache_dir={tmp_path / 'cache'}")
    env = {**os.environ, **s3.env(relay.endpoint), "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "megacore", "train", *args, "--nproc", "2"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, killed = time.time() + 240, False
        while time.time() < deadline and launcher.poll() is None:
            files = bucket_files(ckpts)
            # Rank 0 uploads .metadata, then its own shard, ..., the manifest last.
            if ("step_00000002/manifest.json" in files and "step_00000004/.metadata" in files
                    and "step_00000004/__0_0.distcp" not in files):
                rank0 = _rank0(launcher)
                if rank0 is not None:
                    rank0.send_signal(signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.02)
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        relay.close()
    assert killed, f"never saw step 4 half uploaded:\n{out[-3000:]}"
    assert launcher.returncode != 0
    files = bucket_files(ckpts)
    assert "step_00000004/.metadata" in files and "step_00000004/manifest.json" not in files

    from megacore.checkpoint.store import list_checkpoints

    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002"]
    proc = megacore("export-hf", ckpts, str(tmp_path / "hf"))
    assert f"exported {ckpts}/step_00000002" in proc.stdout
    proc = megacore("train", *args, "--nproc", "2", "--resume", "auto")
    assert f"resumed from {ckpts}/step_00000002 at step 2" in proc.stdout, failure_message(proc)
    files = bucket_files(ckpts)
    # Step 4 was written again whole; retention kept the newest two.
    assert {f.split("/")[0] for f in files} == {"step_00000004", "step_00000006"}
    assert "step_00000004/manifest.json" in files and "step_00000004/__0_0.distcp" in files


def test_export_to_a_bucket_and_init_from_it_round_trip_and_transformers_loads_it(s3, bucket, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from megacore.checkpoint.hf import hf_state
    from megacore.checkpoint.weights import empty_model, init_weights_from, load_trained

    ckpts, hf = f"{bucket}/checkpoints", f"{bucket}/models/tiny-hf"
    megacore("train", *store_args(str(data_dir), tmp_path / "run", "train.steps=2", f"checkpoint.dir={ckpts}"))
    proc = megacore("export-hf", f"{ckpts}/step_00000002", hf)
    assert f"exported {ckpts}/step_00000002 to {hf}" in proc.stdout
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(bucket_files(hf))

    trained = load_trained(ckpts)
    model = empty_model(trained.config)
    init_weights_from(model, hf)
    assert_same_weights(model.state_dict(), trained.model.state_dict(), "init_from the bucket export")

    local = tmp_path / "downloaded"
    fsspec.filesystem("s3").get(hf.removeprefix("s3://") + "/", str(local), recursive=True)
    theirs = AutoModelForCausalLM.from_pretrained(local, torch_dtype=torch.float32).state_dict()
    ours = hf_state(trained.model)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)

    # A 2-rank run starts from the bucket export (sharded slices, checked before launch); its model section
    # comes from the export's config.json (no model.* argument here).
    args = [a for a in store_args(str(data_dir), tmp_path / "from-hf", "train.steps=1", f"train.init_from={hf}")
            if not a.startswith("model.")]
    proc = megacore("train", *args, "--nproc", "2")
    assert f"initialised weights from {hf}" in proc.stdout


@pytest.mark.parametrize("fault, named", [
    ("endpoint", "cannot reach the store (EndpointConnectionError"),
    ("no credentials", "cannot reach the store (NoCredentialsError"),
    ("wrong secret", "access denied (PermissionError"),
    ("read-only key", "access denied (PermissionError"),
    ("no bucket", "bucket 'no-such-bucket-here' does not exist"),
])
def test_a_store_that_cannot_be_used_is_refused_before_launch_naming_the_url(s3, bucket, data_dir, tmp_path,
                                                                             fault, named):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ckpts = "s3://no-such-bucket-here/ckpt" if fault == "no bucket" else f"{bucket}/ckpt"
    if fault == "endpoint":
        from tests.s3_server import free_port

        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    elif fault == "no credentials":
        env.pop("AWS_ACCESS_KEY_ID")
        env.pop("AWS_SECRET_ACCESS_KEY")
    elif fault == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-" + s3.secret
    elif fault == "read-only key":  # may list the bucket; the write probe is refused
        from tests.s3_server import read_only_key

        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = read_only_key(s3)
    require_processes_marker("megacore")
    proc = subprocess.run([sys.executable, "-m", "megacore", "train",
                           *store_args(str(data_dir), tmp_path / "run", f"checkpoint.dir={ckpts}"), "--nproc", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"megacore: error: checkpoint.dir={ckpts}: {named}"), proc.stderr
    assert s3.secret not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_checkpoints_in_a_bucket_commit_by_manifest_and_retention_and_set_aside_work_there(s3, bucket, small_run):
    """The store's rules on a bucket: a prefix without a manifest is no checkpoint; set-aside moves (copy,
    manifest last; delete, manifest first); retention removes stale prefixes too."""
    from megacore.checkpoint.store import (
        ABANDONED,
        MANIFEST,
        latest_checkpoint,
        list_checkpoints,
        prune,
        resolve_checkpoint,
        set_aside_newer,
    )
    from megacore.config import CheckpointConfig

    fs = fsspec.filesystem("s3")
    local = latest_checkpoint(small_run)
    root = f"{bucket}/ck"
    for step in (2, 4, 6):
        fs.put(str(local) + "/", f"{root.removeprefix('s3://')}/step_{step:08d}", recursive=True)
    fs.rm(f"{root.removeprefix('s3://')}/step_00000006/{MANIFEST}")  # an upload that never finished
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000004"]
    assert resolve_checkpoint(root).name == "step_00000004"

    moved = set_aside_newer(root, 2)
    assert [p.name.split(".")[0] for p in moved] == ["step_00000004"] and str(moved[0]).startswith(f"{root}/{ABANDONED}/")
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002"]
    assert f"{ABANDONED}/{moved[0].name}/{MANIFEST}" in bucket_files(root)

    fs.put(str(local) + "/", f"{root.removeprefix('s3://')}/step_00000008", recursive=True)
    committed = list_checkpoints(root)[-1]
    prune(committed.parent, CheckpointConfig(keep_last=1), committed)
    assert {f.split("/")[0] for f in bucket_files(root)} == {ABANDONED, "step_00000008"}
