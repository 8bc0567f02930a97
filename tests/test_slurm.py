"""The launcher against a real Slurm (slurm/local-cluster/start.sh: slurmctld, slurmd and munge on this
machine, started once for this module): jobs run to completion, survive `scontrol requeue` and a
preemption signal with the final loss of an undisturbed job, arrays and dependency chains."""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from launcher.slurm import job_state
from tests.helpers import REPO, TINY, megacore, read_metrics, require_slurm

START, STOP = REPO / "slurm/local-cluster/start.sh", REPO / "slurm/local-cluster/stop.sh"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_slurm()
    state = tmp_path_factory.mktemp("slurm")
    # 8 declared CPUs on this 2-core machine: the module's jobs run side by side (most of a tiny job's time
    # is start-up and Slurm's requeue delay, not arithmetic).
    env = {**os.environ, "MEGACORE_SLURMCTLD_PORT": "6917", "MEGACORE_SLURMD_PORT": "6918", "MEGACORE_SLURM_CPUS": "8"}
    proc = subprocess.run([str(START), str(state)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield state
    subprocess.run([str(STOP), str(state)], capture_output=True, timeout=120)
    if old is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="module")
def spec(cluster, data_dir, tmp_path_factory):
    """Write a job spec for the local cluster (procs ranks per job); returns its path."""
    root = tmp_path_factory.mktemp("jobs")

    def make(name: str, *overrides: str, procs: int = 2, **keys) -> Path:
        profile = root / f"local-{procs}.yaml"
        profile.write_text(yaml.safe_dump({"partition": "debug", "procs_per_node": procs, "cpus_per_node": procs,
                                           "time_limit": "00:10:00"}))
        job = {"name": name, "cluster": str(profile), "config": "configs/tiny.yaml",
               "overrides": [*TINY, f"data.dir={data_dir}", f"train.run_dir={root / name}", *overrides], **keys}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job))
        return path
    return make


def submit(job_file: Path) -> str:
    out = megacore("launch", "submit", job_file).stdout
    return out.split("submitted job ")[1].split()[0]


def wait(job_id: str, timeout: float = 240, until=FINAL) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job_id)
        if state["JobState"] in until:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {state['JobState']} after {timeout} s")


def wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        lines = path.read_text().split("\n")[:-1] if path.exists() else []  # complete lines only
        if any(json.loads(line)["step"] >= step for line in lines):
            return
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} did not reach step {step}")


RUN = ["train.steps=30", "checkpoint.every=5", "train.eval_every=1000", "checkpoint.keep_last=2"]
DISTURB_AT, LAST = 10, 30
LRS = ["1e-3", "2e-3", "4e-3"]


def _at_step(run_dir: Path, step: int, argv: list[str]) -> None:
    wait_for_step(run_dir, step)
    subprocess.run(argv, check=True)


@pytest.fixture(scope="module")
def jobs(spec):
    """Every job of this module, submitted at once: {name: (job file, job id)}."""
    specs = {
        "undisturbed": spec("undisturbed", *RUN),
        "requeued": spec("requeued", *RUN),
        "preempted": spec("preempted", *RUN),
        "sweep": spec("sweep", "train.steps=4", "train.eval_every=1000", procs=1,
                      sweep=[[f"optim.lr={lr}"] for lr in LRS]),
        "stage1": spec("stage1", "train.steps=6", "train.eval_every=1000"),
        "cancelled": spec("cancelled", "train.steps=5000", "train.eval_every=1000", "checkpoint.every=5000"),
        # Run health: a rank hangs at step 12 (torchrun may not restart: max_restarts 0), and a persistent
        # NaN with health.nonfinite=stop (megacore/health/faults.py injects both, in the first start only).
        "hung": spec("hung", *RUN, "health.hang_timeout_s=10", "health.heartbeat_s=1",
                     env={"MEGACORE_FAULTS": json.dumps([{"kind": "hang", "step": 12, "rank": 1}])}),
        "fatal": spec("fatal", "train.steps=8", "train.eval_every=1000", "health.nonfinite=stop",
                      env={"MEGACORE_FAULTS": json.dumps([{"kind": "nan", "step": 3, "rank": 0}])}),
    }
    # Two are disturbed mid-run, from threads, while the others run: a requeue by the admin, and the
    # signal Slurm sends before a time limit (--signal=B:USR1@grace).
    disturb = {"requeued": ["scontrol", "requeue"], "preempted": ["scancel", "--batch", "--signal=USR1"]}
    submitted = {}
    for name, path in specs.items():
        submitted[name] = (path, submit(path))
        if name in disturb:
            threading.Thread(target=_at_step, args=(path.parent / name, DISTURB_AT, [*disturb[name], submitted[name][1]]),
                             daemon=True).start()
    stage1 = submitted["stage1"]
    stage2 = spec("stage2", "train.steps=3", "train.eval_every=1000", f"train.init_from={stage1[0].parent / 'stage1'}",
                  after=[stage1[1]])
    submitted["stage2"] = (stage2, submit(stage2))
    return submitted


def run_dir_of(jobs, name) -> Path:
    return jobs[name][0].parent / name


@pytest.fixture(scope="module")
def undisturbed(jobs):
    state = wait(jobs["undisturbed"][1])
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", state
    return run_dir_of(jobs, "undisturbed")


def test_status_cancel_and_logs_take_the_job_spec(jobs):
    """First, so that the long job stops taking CPU from the others."""
    job, job_id = jobs["cancelled"]
    wait_for_step(run_dir_of(jobs, "cancelled"), 2)
    assert job_id in megacore("launch", "status", job).stdout
    assert "step" in megacore("launch", "logs", job).stdout
    assert f"cancelled {job_id}" in megacore("launch", "cancel", job).stdout
    assert wait(job_id)["JobState"] == "CANCELLED"


def test_two_task_job_runs_to_completion_and_records_what_ran(undisturbed):
    metrics = read_metrics(undisturbed)
    assert sorted(metrics) == list(range(1, LAST + 1))
    launch = undisturbed / "launch"
    assert (launch / "git-commit.txt").read_text().strip()
    assert "torch==" in (launch / "pip-freeze.txt").read_text()
    assert yaml.safe_load((undisturbed / "config.yaml").read_text())["train"]["run_dir"] == str(undisturbed)
    log = next(launch.glob("job-*-start-0.log")).read_text()
    assert "2 rank(s)" in log and "ended with status 0" in log
    # (tests/test_multinode.py checks that a Slurm job trains exactly like `megacore train --nproc 2`.)


def test_scontrol_requeue_mid_run_resumes_and_ends_with_the_same_loss(jobs, undisturbed):
    job_id, run_dir = jobs["requeued"][1], run_dir_of(jobs, "requeued")
    state = wait(job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", state
    second = next((run_dir / "launch").glob("job-*-start-1.log")).read_text()
    assert "resumed from" in second
    assert read_metrics(run_dir)[LAST]["loss"] == read_metrics(undisturbed)[LAST]["loss"]


def test_preemption_signal_checkpoints_requeues_and_finishes_the_same(jobs, undisturbed):
    job_id, run_dir = jobs["preempted"][1], run_dir_of(jobs, "preempted")
    state = wait(job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", state
    first = next((run_dir / "launch").glob("job-*-start-0.log")).read_text()
    assert "stopped at step" in first and "requeue 1 of 3" in first
    stopped_at = int(first.split("stopped at step ")[1].split()[0])
    second = next((run_dir / "launch").glob("job-*-start-1.log")).read_text()
    assert f"at step {stopped_at}" in second, "the requeued job resumes where the stop was checkpointed"
    assert read_metrics(run_dir)[LAST]["loss"] == read_metrics(undisturbed)[LAST]["loss"]


def test_a_hang_is_requeued_and_the_job_finishes_the_same(jobs, undisturbed):
    job_id, run_dir = jobs["hung"][1], run_dir_of(jobs, "hung")
    state = wait(job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", state
    first = next((run_dir / "launch").glob("job-*-start-0.log")).read_text()
    assert "health: hang in step 12" in first and "rank 1" in first and "a hang ended the run" in first
    assert "requeue 1 of 3" in first
    assert read_metrics(run_dir)[LAST]["loss"] == read_metrics(undisturbed)[LAST]["loss"]


def test_a_fatal_health_stop_is_not_requeued(jobs):
    state = wait(jobs["fatal"][1])
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "3:0" and state["Restarts"] == "0", state
    log = next((run_dir_of(jobs, "fatal") / "launch").glob("job-*-start-0.log")).read_text()
    assert "step 3: not finite" in log and "run health stopped the run" in log


def test_sweep_runs_as_an_array_of_three(jobs):
    job_id = jobs["sweep"][1]
    for i, lr in enumerate(LRS):
        state = wait(f"{job_id}_{i}")
        assert state["JobState"] == "COMPLETED", state
        run_dir = run_dir_of(jobs, "sweep") / f"sweep_{i}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == float(lr)
        assert sorted(read_metrics(run_dir)) == [1, 2, 3, 4]


def test_dependency_chain_runs_the_second_stage_after_the_first(jobs):
    s1, s2 = wait(jobs["stage1"][1]), wait(jobs["stage2"][1])
    assert s1["JobState"] == s2["JobState"] == "COMPLETED"
    assert s2["StartTime"] >= s1["EndTime"]
    log = next((run_dir_of(jobs, "stage2") / "launch").glob("job-*-start-0.log")).read_text()
    assert "initialised weights from" in log
