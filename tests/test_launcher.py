"""The launcher without a cluster: job specs validated in our terms, and rendered sbatch scripts that stay
inert under hostile values (quotes, $(), backticks, newlines, unicode), checked by executing them."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher.render import render_sbatch
from launcher.spec import ClusterProfile, JobSpec, load_job, validate
from megacore.config import ConfigError
from tests.helpers import REPO, megacore

HOSTILE = ["a'b", 'a"b', "$(touch PWNED)", "`touch PWNED`", "x; touch PWNED", "x\ntouch PWNED", "x\r\ntouch PWNED",
           "ünï©ødé ☃ 日本", "$HOME ${PATH} $1 $@", "\\", "--resume=none", "*", "x' ; touch PWNED ; '", "-n", ""]

# Records its argv and one environment variable as JSON, one line per call: stands in for the cluster's
# python, srun and scontrol so the whole generated script runs here.
STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({"tool": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                        "fuzz": os.environ.get("MEGACORE_FUZZ")}) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("localhost")
"""


def _stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python-stub", "srun", "scontrol"):
        (bin_dir / tool).write_text(STUB)
        (bin_dir / tool).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_reach_the_trainer_verbatim_and_execute_nothing(tmp_path, value):
    config = tmp_path / f"cfg {value.replace('/', '_')[:20]}.yaml"  # a hostile file name, too
    config.write_text((REPO / "configs/tiny.yaml").read_text())
    bin_dir = _stubs(tmp_path)
    job = JobSpec(name="fuzz", config=str(config), env={"MEGACORE_FUZZ": value},
                  overrides=[f"data.dir={value}", f"train.run_dir={tmp_path / 'run'}"],
                  sweep=[["data.tokenizer_type=bpe", f"data.dir={value}x"]] * 2)
    profile = ClusterProfile(python=str(bin_dir / "python-stub"))
    validate(job, profile)
    # Hostile job and profile file names too: they are named in the script's header comment.
    script = render_sbatch(job, profile, job_file=f"jobs/{value}.yaml", profile_file=f"{value}.yaml", workdir=tmp_path)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0

    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_ARRAY_TASK_ID": "1", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("PWNED")), "nothing injected ran"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    train = [c for c in calls if c["tool"] == "srun"][0]["argv"]
    assert f"data.dir={value}" in train and f"data.dir={value}x" in train, "each override arrives as one argument"
    assert train.index(f"data.dir={value}x") > train.index(f"data.dir={value}"), "the sweep entry comes last"
    assert str(config) in train
    assert all(c["fuzz"] == value for c in calls), "environment values arrive unchanged"


@pytest.mark.parametrize("job, profile, named", [
    (JobSpec(name="a b"), ClusterProfile(), "name="),
    (JobSpec(name="x\n#SBATCH --wrap=id"), ClusterProfile(), "name="),
    (JobSpec(name="$(id)"), ClusterProfile(), "name="),
    (JobSpec(), ClusterProfile(partition="gpu\n#SBATCH --uid=0"), "partition="),
    (JobSpec(), ClusterProfile(account="a b"), "account="),
    (JobSpec(time_limit="1:00:00 --x"), ClusterProfile(), "time_limit="),
    (JobSpec(env={"A B": "1"}), ClusterProfile(), "env: 'A B'"),
    (JobSpec(env={"WANDB_API_KEY": "0123"}), ClusterProfile(), "WANDB_API_KEY looks like a secret"),
    *[(JobSpec(env={name: "0123"}), ClusterProfile(), f"{name} looks like a secret")
      for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_KEY", "HF_TOKEN", "HUGGINGFACEHUB_API_TOKEN",
                   "GOOGLE_APPLICATION_CREDENTIALS", "MY_CREDENTIAL_FILE", "DB_PASSWORD", "SMTP_PASSWD")],
    (JobSpec(env={"NOTES": "hf_" + "a1B2" * 10}), ClusterProfile(), "NOTES looks like a secret"),
    (JobSpec(env={"X": "1"}), ClusterProfile(env={"API_TOKEN": "1"}), "API_TOKEN looks like a secret"),
    (JobSpec(pass_env=["NOT A NAME"]), ClusterProfile(), "pass_env: 'NOT A NAME'"),
    (JobSpec(nodes=3, overrides=["parallel.tp=2"]), ClusterProfile(procs_per_node=2),
     "nodes=3 x procs_per_node=2 (from profile) = 6 ranks"),
    (JobSpec(nodes=2, overrides=["train.global_batch_size=12"]), ClusterProfile(procs_per_node=4),
     "= 8 ranks: train.global_batch_size=12 is not divisible"),
    (JobSpec(after=["12; id"]), ClusterProfile(), "is not a job id"),
    (JobSpec(overrides=["optim.lr=fast"]), ClusterProfile(), "optim.lr"),
    (JobSpec(sweep=[["model.n_heads=7"]]), ClusterProfile(), "model.n_heads"),
    (JobSpec(nodes=0), ClusterProfile(), "nodes must be >= 1"),
])
def test_bad_specs_are_refused_naming_the_key(job, profile, named):
    with pytest.raises(ConfigError, match=named.replace("$", r"\$").replace("(", r"\(").replace(")", r"\)")):
        validate(job, profile)


@pytest.mark.parametrize("run_dir", ["runs/with space", "runs/$(id)", "runs/a'b", "runs/x\ny"])
def test_run_dirs_that_cannot_be_an_sbatch_path_are_refused(run_dir):
    job = JobSpec(overrides=[f"train.run_dir={run_dir}"])
    with pytest.raises(ConfigError, match="#SBATCH"):
        render_sbatch(job, ClusterProfile())


def test_job_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "nodez": 2}))
    with pytest.raises(ConfigError, match=r"job\.yaml.*nodez"):
        load_job(bad)
    bad.write_text(yaml.safe_dump({"name": "x", "cluster": "no-such-cluster"}))
    with pytest.raises(ConfigError, match="no-such-cluster.*known: .*local"):
        load_job(bad)
    proc = megacore("launch", "render", bad, check=False)
    assert proc.returncode == 2 and "no-such-cluster" in proc.stderr


def test_render_of_the_16_node_example_is_what_the_docs_show():
    rendered = megacore("launch", "render", "configs/jobs/llama-1b-16nodes.yaml").stdout
    assert "#SBATCH --nodes=16" in rendered and "#SBATCH --gpus-per-node=8" in rendered
    assert '--rdzv-endpoint="$head:$port"' in rendered and "--nproc-per-node=8" in rendered
    page = (REPO / "docs" / "sbatch-example.md").read_text()
    body = [l for l in rendered.splitlines() if not l.startswith("#SBATCH --chdir=")]
    assert all(line in page for line in body if line.strip()), "docs/sbatch-example.md shows the current render"


def test_secrets_travel_by_name_and_no_value_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-value-never-on-disk")
    job = JobSpec(name="named", pass_env=["WANDB_API_KEY"], overrides=[f"train.run_dir={tmp_path / 'run'}"])
    profile = ClusterProfile(python="python3")
    validate(job, profile)
    script = render_sbatch(job, profile, workdir=tmp_path)
    assert "WANDB_API_KEY" in script and "s3cr3t-value-never-on-disk" not in script
    assert "for name in WANDB_API_KEY; do" in script
