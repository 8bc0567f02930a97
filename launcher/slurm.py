"""Talking to Slurm: submit a rendered job, and status, cancel and logs of what a job spec submitted.

Commands run as argument lists (no shell). The ids a spec submitted are kept in RUN_DIR/slurm/jobs.txt,
so `status`, `cancel` and `logs` take the same JOB.yaml as `submit`.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from launcher.render import log_dir_of, render_sbatch, run_dir_of
from launcher.spec import ClusterProfile, JobSpec
from megacore.errors import MegacoreError


class SlurmError(MegacoreError, RuntimeError):
    """sbatch, squeue or scancel failed; the message carries Slurm's own words."""


def _run(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} not found: is this a Slurm login node (or is SLURM_CONF set)?") from None
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(argv[:2])} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def submit(job: JobSpec, profile: ClusterProfile, job_file: str, profile_file: str) -> str:
    """Render, keep the script next to the logs, sbatch it; returns the job id."""
    script = render_sbatch(job, profile, job_file, profile_file)
    log_dir = log_dir_of(job)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{job.name}.sbatch"
    path.write_text(script)
    # The submitting environment goes along (sbatch's default --export=ALL): that is how secrets such as
    # WANDB_API_KEY reach the job without being written anywhere.
    job_id = _run(["sbatch", "--parsable", str(path)]).strip().split(";")[0]
    with open(log_dir / "jobs.txt", "a") as f:
        f.write(job_id + "\n")
    return job_id


def submitted_ids(job: JobSpec) -> list[str]:
    path = log_dir_of(job) / "jobs.txt"
    if not path.is_file():
        raise SlurmError(f"nothing submitted for job {job.name} yet (no {path})")
    return path.read_text().split()


def job_state(job_id: str) -> dict[str, str]:
    """Key=value fields of `scontrol show job` (JobState, RestartCnt, ExitCode, ...), for every array task."""
    out = _run(["scontrol", "show", "job", "--oneliner", job_id])
    first = out.strip().splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S*)", first))


def status(job: JobSpec) -> list[str]:
    lines = []
    for job_id in submitted_ids(job):
        try:
            out = _run(["scontrol", "show", "job", "--oneliner", job_id])
        except SlurmError as e:
            lines.append(f"{job_id}  unknown ({e})")
            continue
        for row in out.strip().splitlines():
            f = dict(re.findall(r"(\w+)=(\S*)", row))
            task = f"_{f['ArrayTaskId']}" if f.get("ArrayTaskId") else ""
            lines.append(f"{f['JobId']}{task}  {f.get('JobState', '?'):<10} restarts {f.get('Restarts', '0'):<3} "
                         f"elapsed {f.get('RunTime', '?'):<10} exit {f.get('ExitCode', '?'):<5} "
                         f"{f.get('NodeList', '')}")
    return lines


def cancel(job: JobSpec) -> list[str]:
    ids = submitted_ids(job)
    _run(["scancel", *ids])
    return ids


def logs(job: JobSpec, lines: int = 40) -> str:
    """The newest start's log of the run (per job and restart, written by the batch script)."""
    found = sorted((run_dir_of(job)).rglob("launch/job-*-start-*.log"), key=os.path.getmtime)
    if not found:
        raise SlurmError(f"no job logs under {run_dir_of(job)} yet")
    newest = found[-1]
    text = newest.read_text(errors="replace").splitlines()
    return f"==> {newest} <==\n" + "\n".join(text[-lines:])


def script_path(job: JobSpec) -> Path:
    return log_dir_of(job) / f"{job.name}.sbatch"
