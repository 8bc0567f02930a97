"""A job spec and its cluster profile -> the sbatch script (Jinja2, slurm/templates/sbatch.sh.j2).

Every user value that reaches the shell goes through `shlex.quote` (the template's `q` filter), text in
comment lines through `comment` (control characters escaped); values in `#SBATCH` directives were
refused by the spec unless plain, and env values that look secret were refused (they travel by name).
The script is the same for one node and for a hundred: one srun task per node runs torchrun with c10d
rendezvous on the first node.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import jinja2

from launcher.spec import PLAIN, ClusterProfile, JobSpec, training_config
from launcher.torchrun import TORCHRUN_ENV
from megacore.config import ConfigError, parse_override

TEMPLATES = Path(__file__).resolve().parent.parent / "slurm" / "templates"


def run_dir_of(job: JobSpec, extra: list[str] = ()) -> Path:
    return Path(training_config(job, extra).train.run_dir).resolve()


def log_dir_of(job: JobSpec) -> Path:
    """Where Slurm writes each job's output (%x-%j.out); `submit` creates it."""
    return run_dir_of(job) / "slurm"


def _sweep_entries(job: JobSpec, base: Path) -> list[dict]:
    """Each array task's extra overrides and run directory (RUN_DIR/sweep_I unless the entry sets one)."""
    entries = []
    for i, extra in enumerate(job.sweep):
        sets_run_dir = any(parse_override(o)[0] == "train.run_dir" for o in extra)
        entries.append({"overrides": extra,
                        "run_dir": str(run_dir_of(job, extra) if sets_run_dir else base / f"sweep_{i}")})
    return entries


def render_sbatch(job: JobSpec, profile: ClusterProfile, job_file: str = "JOB.yaml",
                  profile_file: str = "PROFILE.yaml", workdir: Path | None = None) -> str:
    workdir = (workdir or Path.cwd()).resolve()
    run_dir, log_dir = run_dir_of(job), log_dir_of(job)
    for key, path in (("working directory", workdir), ("train.run_dir", log_dir)):
        if not PLAIN.match(str(path)):
            raise ConfigError(f"{job_file}: {key} {str(path)!r} goes into an #SBATCH directive: no spaces, "
                              f"quotes or shell characters in it")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    # For text in comment lines: newlines and other control characters escaped, so it stays one comment.
    env.filters["comment"] = lambda value: json.dumps(str(value), ensure_ascii=False)[1:-1]
    return env.get_template("sbatch.sh.j2").render(
        job=job, profile=profile, job_file=job_file, profile_file=profile_file, workdir=workdir,
        log_dir=log_dir, run_dir=str(run_dir), sweep=_sweep_entries(job, run_dir),
        time_limit=job.time_limit or profile.time_limit, python=profile.python or sys.executable,
        env={**profile.env, **job.env}, pass_env=job.pass_env, torchrun_env=TORCHRUN_ENV,
        omp_threads=max(1, profile.cpus_per_node // profile.procs_per_node))
