"""More than one node: the generated sbatch script runs unchanged as a 2-node job on a real Slurm whose nodes
live in their own network namespaces, and two torchrun agents on loopback train as one group, restart
together after a worker is killed, and resume exactly."""

import os
import re
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from megacore.checkpoint.store import list_checkpoints
from tests.helpers import REPO, TINY, assert_same_weights, megacore, read_metrics, require_slurm, tiny_run_args

START, STOP = REPO / "slurm/local-cluster/start.sh", REPO / "slurm/local-cluster/stop.sh"
RUN = ["train.steps=30", "checkpoint.every=5", "train.eval_every=1000", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The same training as one 2-rank torchrun group on one node."""
    run = tmp_path_factory.mktemp("reference") / "run"
    megacore("train", *tiny_run_args(data_dir, run), *RUN, "--nproc", "2")
    return run


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    require_slurm("ip", "nsenter", "unshare", what="a 2-node local Slurm in network namespaces")
    state = tmp_path_factory.mktemp("slurm2")
    env = {**os.environ, "MEGACORE_SLURM_NODES": "2", "MEGACORE_SLURM_CPUS": "1",
           "MEGACORE_SLURMCTLD_PORT": "7017", "MEGACORE_SLURMD_PORT": "7018", "SLURM_CONF": str(state / "slurm.conf")}
    proc = subprocess.run([str(START), str(state)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    client = re.search(r"client commands: (.+) <command>", proc.stdout).group(1).split()
    yield client, env
    subprocess.run([str(STOP), str(state)], env=env, capture_output=True, timeout=120)


def test_generated_sbatch_runs_unchanged_on_two_nodes_with_the_one_node_loss(two_node_cluster, reference, data_dir,
                                                                           tmp_path):
    client, env = two_node_cluster
    profile = tmp_path / "two-nodes.yaml"
    profile.write_text(yaml.safe_dump({"partition": "debug", "procs_per_node": 1, "cpus_per_node": 1}))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "two-nodes", "cluster": str(profile), "nodes": 2, "config": "configs/tiny.yaml",
                                   "overrides": [*TINY, f"data.dir={data_dir}", f"train.run_dir={tmp_path / 'run'}", *RUN]}))
    # sbatch from inside node1's namespace (the controller's address exists only there).
    out = subprocess.run([*client, sys.executable, "-m", "megacore", "launch", "submit", str(job)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    job_id = out.split("submitted job ")[1].split()[0]
    deadline, state = time.time() + 240, ""
    while time.time() < deadline:
        show = subprocess.run([*client, "scontrol", "show", "job", "--oneliner", job_id], env=env,
                              capture_output=True, text=True).stdout
        state = re.search(r"JobState=(\S+)", show).group(1)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        time.sleep(0.5)
    log = next((tmp_path / "run" / "launch").glob("job-*-start-0.log")).read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "NodeList=node[1-2]" in show
    assert "2 rank(s)" in log
    two_nodes, one_node = read_metrics(tmp_path / "run"), read_metrics(reference)
    assert [two_nodes[s]["loss"] for s in range(1, 31)] == pytest.approx([one_node[s]["loss"] for s in range(1, 31)],
                                                                         rel=1e-6)


def test_two_torchrun_agents_restart_together_after_a_worker_is_killed_and_resume_exactly(reference, data_dir,
                                                                                         tmp_path):
    from launcher.torchrun import TORCHRUN_ENV

    run = tmp_path / "run"
    port = 29000 + os.getpid() % 1000
    env = {**os.environ, **TORCHRUN_ENV, "PYTHONUNBUFFERED": "1"}
    agents = []
    for is_host in (1, 0):  # two "nodes" on loopback; the first hosts the c10d rendezvous store
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--max-restarts=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-agents",
                f"--rdzv-conf=is_host={is_host}", "-m", "megacore.cli", "train", "configs/tiny.yaml", *TINY,
                f"data.dir={data_dir}", f"train.run_dir={run}", *RUN, "--resume", "auto"]
        agents.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True))
    victim, deadline = None, time.time() + 240
    while victim is None and time.time() < deadline and agents[1].poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) > 12:
            workers = psutil.Process(agents[1].pid).children()
            if workers:
                victim = workers[0]
                victim.kill()  # kill -9 of the second agent's worker, mid-run
        time.sleep(0.05)
    outs = [a.communicate(timeout=300)[0] for a in agents]
    assert victim is not None, "the run ended before a worker could be killed"
    assert [a.returncode for a in agents] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "resumed from" in outs[0] + outs[1]
    assert_same_weights(reference, run, "after the group restart the run ends where an undisturbed one does")
    assert [p.name for p in list_checkpoints(run)][-1] == "step_00000030"
