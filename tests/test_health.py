"""Run health (megacore/health/): a NaN, a spike, a hung rank, a stopped rank and a slow rank are found,
named and survived with nothing lost, on real 2-rank runs. Faults are injected through the test-only
seam MEGACORE_FAULTS (megacore/health/faults.py) at a chosen step and rank."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megacore.checkpoint.store import is_healthy, list_checkpoints
from megacore.health.events import read_events
from tests.helpers import (
    REPO,
    TINY,
    assert_same_weights,
    failure_message,
    megacore,
    popen_failure,
    rank_processes,
    read_metrics,
    tiny_run_args,
    trained_weights,
)

# 10 steps, a checkpoint every 3: a fault at step 5 resumes from step 3.
STEPS = ["train.steps=10", "checkpoint.every=3", "train.eval_every=10"]
# A short leash for the tests: a hang is one after 5 s, heartbeats twice a second.
WATCHDOG = ["health.hang_timeout_s=5", "health.heartbeat_s=0.5"]


def faults(*specs: dict) -> dict:
    return {**os.environ, "MEGACORE_FAULTS": json.dumps(list(specs)), "PYTHONUNBUFFERED": "1"}


def train(*args: str, env=None, check: bool = True, nproc: int = 2) -> subprocess.CompletedProcess:
    """`megacore train ARGS --nproc N`, with the faults of `env`."""
    cmd = [sys.executable, "-m", "megacore", "train", *args, "--nproc", str(nproc)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(failure_message(proc))
    return proc


@pytest.fixture(scope="module")
def undisturbed(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("health") / "undisturbed"
    train(*tiny_run_args(data_dir, run, *STEPS))
    return run


def kinds(run) -> list[str]:
    return [e["kind"] for e in read_events(run)]


def test_a_transient_nan_is_run_again_and_the_run_equals_an_undisturbed_one(undisturbed, tiny_args, tmp_path):
    from tests.wandb_offline import offline_runs

    proc = train(*tiny_args("run", *STEPS, "health.nonfinite=rerun", "logging.wandb_mode=offline"),
                 env=faults({"kind": "nan", "step": 5, "rank": 1, "times": 1}))
    assert "step 5 was bad (not finite" in proc.stdout and "a transient fault, the rerun is kept" in proc.stdout
    assert kinds(tmp_path / "run") == ["rerun", "rerun"]
    (wandb_run,) = offline_runs(tmp_path / "run")
    assert [title for title, _ in wandb_run["alerts"]] == ["megacore: rerun"], "one alert per kind (rate-limited)"
    assert_same_weights(undisturbed, tmp_path / "run", "nothing skipped: bitwise the undisturbed run")


class Snapshots:
    """A hook that keeps every parameter and optimizer state after each step, and counts host syncs
    inside train_step (megacore/monitor/host_syncs.py)."""

    def __init__(self):
        from megacore.monitor.host_syncs import HostSyncCounter

        self.counter_class, self.counter, self.state, self.syncs = HostSyncCounter, None, {}, {}

    def before_step(self, trainer, step):
        self.counter = self.counter_class()
        self.counter.__enter__()

    def after_step(self, trainer, step, result):
        self.counter.__exit__(None, None, None)
        self.syncs[step] = self.counter.where
        opt = trainer.module.optimizers.optimizers[0]
        self.state[step] = ({n: p.detach().clone() for n, p in trainer.module.parts[0].named_parameters()},
                            [{k: v.clone() for k, v in s.items()} for s in opt.state.values()])

    def after_eval(self, trainer, step, results):
        pass

    def after_save(self, trainer, step, path):
        pass


def test_a_persistent_nan_is_skipped_on_the_device_and_changes_nothing(data_dir, tmp_path, monkeypatch):
    from megacore.config import load_config
    from megacore.train.trainer import train as run_training

    monkeypatch.setenv("MEGACORE_FAULTS", json.dumps([{"kind": "nan", "step": 3, "rank": 0}]))
    cfg = load_config(REPO / "configs/tiny.yaml", [*TINY, f"data.dir={data_dir}", f"train.run_dir={tmp_path / 'run'}",
                                                    "train.steps=5", "logging.log_every=5", "checkpoint.every=100"])
    hook = Snapshots()
    run_training(cfg, hooks=(hook,))
    # (Steps 1 and 5 hold the memory report's gather and the logging step's reads.)
    assert {step: hook.syncs[step] for step in (2, 3, 4)} == {2: [], 3: [], 4: []}, "no host sync inside train_step"
    (params_2, optim_2), (params_3, optim_3) = hook.state[2], hook.state[3]
    assert all(torch.equal(params_2[n], params_3[n]) for n in params_2), "weights unchanged by the skipped step"
    assert all(torch.equal(a[k], b[k]) for a, b in zip(optim_2, optim_3) for k in a), "moments and step counts too"
    assert not all(torch.equal(params_3[n], hook.state[4][0][n]) for n in params_3), "step 4 trains again"
    assert [(e["kind"], e["step"]) for e in read_events(tmp_path / "run")] == [("skip", 3)]


def test_a_run_that_skipped_a_step_resumes_after_kill_9_as_if_never_killed(tiny_args, tmp_path):
    persistent = faults({"kind": "nan", "step": 5, "rank": 0, "restarts": True})
    train(*tiny_args("straight", *STEPS), env=persistent)
    cmd = [sys.executable, "-m", "megacore", "train", *tiny_args("killed", *STEPS), "--nproc", "2", "--max-restarts", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=persistent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.time() + 300, False
    while not killed and time.time() < deadline and proc.poll() is None:
        if (tmp_path / "killed" / "metrics.jsonl").is_file() and 7 in read_metrics(tmp_path / "killed"):
            rank_processes(proc.pid)[1].kill()  # after step 7: the restart resumes from step 6
            killed = True
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    assert killed and proc.returncode == 0, popen_failure(proc, out)
    assert "resumed from" in out
    assert_same_weights(tmp_path / "straight", tmp_path / "killed", "resumed: the skip decided as before")
    assert [e["step"] for e in read_events(tmp_path / "killed") if e["kind"] == "skip"] == [5]


def test_a_rollback_equals_a_fresh_run_told_to_skip_that_step(tiny_args, tmp_path):
    proc = train(*tiny_args("rollback", *STEPS, "health.nonfinite=rollback"),
                 env=faults({"kind": "nan", "step": 5, "rank": 1}))
    assert "rolled back to step_00000003" in proc.stdout and "it recurred after a rollback" in proc.stdout
    train(*tiny_args("told", *STEPS, "health.skip_steps=[5]"))
    assert_same_weights(tmp_path / "rollback", tmp_path / "told")
    assert kinds(tmp_path / "rollback") == ["rollback", "rollback", "skip"]


def test_the_spike_window_survives_a_resume(tiny_args, tmp_path):
    spiky = ["health.spike=skip", "health.spike_window=8", "health.spike_min_history=4", "train.steps=10",
             "checkpoint.every=6", "train.eval_every=10"]
    spike = faults({"kind": "spike", "step": 9, "rank": 0, "restarts": True})
    train(*tiny_args("straight", *spiky), env=spike, nproc=1)
    train(*tiny_args("resumed", *spiky, "train.stop_after=6"), env=spike, nproc=1)
    train(*tiny_args("resumed", *spiky), "--resume", "auto", env=spike, nproc=1)
    # After the resume only steps 7-8 are new: without the window from the checkpoint (4 steps needed),
    # the spike at step 9 would not be seen, and be trained on.
    for run in ("straight", "resumed"):
        assert [(e["kind"], e["step"]) for e in read_events(tmp_path / run)] == [("skip", 9)], run
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_divergence_keeps_a_healthy_checkpoint_stops_and_says_what_happened(data_dir, tmp_path):
    run = tmp_path / "diverged"
    # The demo's model (TINY's is too small to overflow) at lr 50: its gradients overflow from step 3 on.
    proc = megacore("train", "configs/tiny.yaml", f"data.dir={data_dir}", f"train.run_dir={run}", "optim.lr=50",
                    "optim.grad_clip=0", "optim.warmup_steps=4", "train.steps=30", "checkpoint.every=1",
                    "checkpoint.keep_last=2", "data.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=8",
                    "train.eval_batches=2", "train.peak_tflops=0.1", "logging.log_every=1", check=False)
    assert proc.returncode == 3, failure_message(proc)
    assert "steps skipped in a row" in proc.stdout and "rolled back to" in proc.stdout
    assert "stopping (exit status 3)" in proc.stdout
    checkpoints = list_checkpoints(run)
    assert any(is_healthy(c) for c in checkpoints), [c.name for c in checkpoints]
    for c in checkpoints:
        assert all(torch.isfinite(w).all() for w in trained_weights(c).values()), c.name
    assert (run / "health" / "STOPPED").is_file()
    history = megacore("health", run).stdout
    assert "rollback" in history and "skipped steps:" in history and "last exit: stopped" in history


@pytest.mark.parametrize("fault", ["hang", "stop"])
def test_a_hung_or_stopped_rank_is_named_and_the_run_finishes_as_if_undisturbed(fault, undisturbed, tiny_args,
                                                                              tmp_path):
    run = tmp_path / "run"
    proc = train(*tiny_args("run", *STEPS, *WATCHDOG), "--max-restarts", "1",
                 env=faults({"kind": fault, "step": 5, "rank": 1}))
    (hang,) = [e for e in read_events(run) if e["kind"] == "hang"]
    assert hang["ranks"] == [1] and hang["step"] == 5
    why = {"hang": "stuck in step 5", "stop": "stopped (SIGSTOP"}[fault]
    assert why in hang["message"] and why in proc.stdout
    first_life = [json.loads(l) for l in (run / "metrics.superseded.jsonl").read_text().splitlines()]
    step_4_logged = next(r["time"] for r in first_life if r["kind"] == "train" and r["step"] == 4)
    assert hang["time"] - step_4_logged < 5 + 1 + 5, "named within the hang timeout and a small margin"
    stacks = {p.name: p.read_text() for p in (run / "health" / "stacks").glob("rank-*.txt")}
    assert "hang:" in stacks["rank-00000.txt"], "the live rank's stacks are on disk"
    if fault == "hang":
        assert "faults.py" in stacks["rank-00001.txt"], "the hung rank's own stacks show where it is stuck"
    assert "resumed from" in proc.stdout
    assert_same_weights(undisturbed, run, "restarted from the last checkpoint: bitwise the undisturbed run")


def _pinned_run(tiny_args, tmp_path, name: str, slow_rank: int | None):
    """A 2-rank run with each rank on its own core; `slow_rank` shares its core with two busy loops. While
    it trains, SIGUSR2 goes to rank 1."""
    # (global batch 32: steps of a few tenths of a second, so a 5-step window outlasts this VM's noise)
    cmd = [sys.executable, "-m", "megacore", "train", *tiny_args(name, "train.steps=25", "logging.log_every=5",
                                                                  "checkpoint.enabled=false", "train.global_batch_size=32"),
           "--nproc", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ranks = []
    while len(ranks) < 2 and proc.poll() is None:
        ranks = sorted(rank_processes(proc.pid), key=lambda p: int(p.environ()["RANK"]))
        time.sleep(0.1)
    cores = sorted(os.sched_getaffinity(0))[:2]
    for rank, core in zip(ranks, cores):
        os.sched_setaffinity(rank.pid, {core})
    busy = []
    if slow_rank is not None:
        # Two busy loops on its core leave the slow rank about a third of it: a clear straggler even on a VM
        # whose cores are not whole (one loop left it 1.1x-2.4x slower here).
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        for loop in busy:
            os.sched_setaffinity(loop.pid, {cores[slow_rank]})
    while not (tmp_path / name / "metrics.jsonl").is_file() and proc.poll() is None:
        time.sleep(0.1)
    os.kill(ranks[1].pid, signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    for loop in busy:
        loop.kill()
        loop.wait()
    assert proc.returncode == 0, popen_failure(proc, out)
    return out, read_metrics(tmp_path / name, "stragglers")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to pin 2 ranks apart")
def test_a_rank_slowed_from_outside_is_named_and_an_undisturbed_run_names_none(tiny_args, tmp_path):
    out, records = _pinned_run(tiny_args, tmp_path, "slowed", slow_rank=1)
    windows = list(records.values())[1:]
    # Every window names rank 1; its typical window shows it clearly slower (one window of a noisy VM may not).
    assert all(r["slowest_rank"] == 1 for r in windows), records
    assert sorted(r["slowest_ratio"] for r in windows)[len(windows) // 2] > 1.5, records
    assert "straggler: rank 1" in out and "rank 1 is the slowest rank" in out
    assert [e["slowest_rank"] for e in read_events(tmp_path / "slowed") if e["kind"] == "straggler"] == [1]
    out, records = _pinned_run(tiny_args, tmp_path, "calm", slow_rank=None)
    assert all(r["slowest_ratio"] < 1.5 for r in records.values()) and "straggler" not in out, records
    # SIGUSR2 to rank 1 (in both runs): every rank wrote its stacks, and training went on.
    for name in ("slowed", "calm"):
        stacks = tmp_path / name / "health" / "stacks"
        assert all("Thread" in (stacks / f"rank-{r:05d}.txt").read_text() for r in (0, 1)), name


def test_a_restart_loop_is_stopped_and_a_clean_end_breaks_it(tmp_path):
    from megacore.health.restarts import mark_ended, restart_loop

    assert [restart_loop(tmp_path, 40, limit=3) for _ in range(3)] == [None] * 3  # three crashes at step 40
    assert "restart loop: the 3 starts before this one all continued from step 40" in restart_loop(tmp_path, 40, 3)
    assert restart_loop(tmp_path, 50, 3) is None, "progress"
    mark_ended(tmp_path)
    assert [restart_loop(tmp_path, 50, 3) for _ in range(3)] == [None] * 3, "the clean end counts as no crash"


def test_health_policies_deepspeed_cannot_honour_are_refused_by_name():
    from megacore.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="health.nonfinite=skip with parallel.backend=deepspeed"):
        load_config(REPO / "configs/tiny.yaml", ["parallel.backend=deepspeed", "health.nonfinite=skip"])
    cfg = load_config(REPO / "configs/tiny.yaml", ["parallel.backend=deepspeed"])
    assert cfg.health.policy("nonfinite", "deepspeed") == "stop" and cfg.health.policy("nonfinite", "torch") == "skip"
