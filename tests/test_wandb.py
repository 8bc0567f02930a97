"""W&B: one run across stops and resumes (read back from the offline files with wandb's own records), and
a dead W&B server that never slows training down."""

import json
import os
import time

from megacore.checkpoint.store import list_checkpoints
from tests.helpers import megacore, read_metrics
from tests.wandb_offline import offline_runs

STEPS = ["train.steps=8", "train.eval_every=4", "checkpoint.every=4"]


def _environment(monkeypatch, home, **values):
    """No W&B key, settings or netrc from the machine running the tests; then `values`."""
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def test_one_wandb_run_across_stop_and_resume(tiny_args, tmp_path, monkeypatch):
    _environment(monkeypatch, tmp_path)  # no key anywhere: auto -> offline
    args = tiny_args("run", *STEPS, "logging.wandb_mode=auto", "logging.wandb_tags=[tiny]")
    first = megacore("train", *args, "train.stop_after=4", "--nproc", "2")
    assert "wandb sync" in first.stdout
    megacore("train", *args, "--resume", "auto", "--nproc", "2")

    runs = offline_runs(tmp_path / "run")
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"], "the resumed start continues the same run"
    steps = [row["_step"] for run in runs for row in run["history"]]
    assert steps == list(range(1, 9)), "steps strictly increasing, none repeated"
    rows = {row["_step"]: row for run in runs for row in run["history"]}
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops", "train/mfu",
                "train/peak_memory_gib", "train/epoch_progress"):
        assert all(key in rows[s] for s in range(1, 9)), key
    assert {"val/loss", "val/perplexity", "val/bits_per_byte", "checkpoint/seconds"} <= set(rows[4]) & set(rows[8])
    assert "restarts/torchrun" in rows[1] and "restarts/slurm" in rows[5]
    jsonl = read_metrics(tmp_path / "run")
    assert [rows[s]["train/loss"] for s in range(1, 9)] == [jsonl[s]["loss"] for s in range(1, 9)]
    config = runs[1]["config"]
    assert config["git_commit"] and config["train"]["steps"] == 8
    # The id travels with every checkpoint, so a run directory restored from a checkpoint continues it too.
    assert {json.loads((c / "meta.json").read_text())["wandb_run_id"] for c in list_checkpoints(tmp_path / "run")} \
        == {runs[0]["id"]}


def test_unreachable_wandb_server_costs_training_nothing(tiny_args, tmp_path, monkeypatch):
    """An API key but a server that refuses connections (a closed port on loopback): auto mode goes
    offline after one refused connect; the run takes as long as one without W&B, and its steps are as fast
    as those of a run that writes W&B offline from the start."""
    _environment(monkeypatch, tmp_path, WANDB_API_KEY="x" * 40, WANDB_BASE_URL="http://127.0.0.1:9")
    steps = ["train.steps=20", "train.eval_every=1000", "checkpoint.every=1000"]
    start = time.perf_counter()
    megacore("train", *tiny_args("plain", *steps), "--nproc", "2")
    plain = time.perf_counter() - start
    megacore("train", *tiny_args("offline", *steps, "logging.wandb_mode=offline"), "--nproc", "2")
    start = time.perf_counter()
    proc = megacore("train", *tiny_args("dead_server", *steps, "logging.wandb_mode=auto"), "--nproc", "2")
    with_wandb = time.perf_counter() - start
    assert "wandb sync" in proc.stdout and "W&B" not in proc.stderr
    assert with_wandb < plain + 10, f"{with_wandb:.1f} s with W&B vs {plain:.1f} s without"
    # Per step, the reference is the offline run: on a 2-core machine W&B's own writer process takes a
    # share of the CPUs from the two ranks (10-40% here), which is the local cost of W&B, not of the
    # unreachable server. A step that waited on the network would be far slower than that.
    def median(run):
        m = read_metrics(tmp_path / run)
        return sorted(r["tokens_per_s"] for s, r in m.items() if s > 5)[len(m) // 2 - 3]
    assert median("dead_server") > 0.6 * median("offline"), "steady-state throughput unchanged"
    assert [r["_step"] for r in offline_runs(tmp_path / "dead_server")[0]["history"]] == list(range(1, 21))
