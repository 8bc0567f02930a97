"""Job specs and cluster profiles: typed YAML, validated before anything is rendered or submitted.

A job spec (`JOB.yaml`) names a cluster profile (`slurm/clusters/NAME.yaml`, or a path), the node count,
the training config and its overrides. Values that land in `#SBATCH` directives (job name, partition,
account, qos, time, memory, paths) must be plain: sbatch reads directives itself, outside any shell
quoting, so anything else is refused naming the key. Every other user value reaches the shell quoted.
Secrets never go into a spec: they are passed through the submitting environment (sbatch exports it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from megacore.config import ConfigError, load_config, load_dataclass
from megacore.parallel.layout import Layout

CLUSTERS = Path(__file__).resolve().parent.parent / "slurm" / "clusters"
PLAIN = re.compile(r"^[A-Za-z0-9_.@%+,:=/-]*$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A variable whose name has a part like these holds a secret: WANDB_API_KEY, WANDB_KEY, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, HF_TOKEN, HUGGING_FACE_HUB_TOKEN, GOOGLE_APPLICATION_CREDENTIALS, DB_PASSWD, ...
_SECRET_PART = re.compile(r"(KEY|TOKEN|SECRET|PASSWO?R?D|PASS|CREDENTIALS?|AUTH|PRIVATE|SESSION|COOKIE)$|CREDENTIAL",
                          re.IGNORECASE)
# Values in the formats of well-known tokens, whatever the variable is called.
_SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|sk-[A-Za-z0-9_-]{20,}"
                           r"|(AKIA|ASIA)[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,}|glpat-[A-Za-z0-9_-]{20,})|-----BEGIN ")


def looks_secret(name: str, value: str = "") -> bool:
    """True for a variable named like a secret, or a value in a known token format."""
    parts = [p for p in re.split(r"[_\W]+", name) if p]
    return any(_SECRET_PART.search(p) for p in parts) or bool(_SECRET_VALUE.search(value))


@dataclass
class ClusterProfile:
    partition: str = ""
    account: str = ""
    qos: str = ""
    # Ranks per node: one per GPU on GPU clusters; CPU ranks on CPU-only nodes.
    procs_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 1
    mem: str = ""  # e.g. "0" (all of the node) or "480G"; empty leaves Slurm's default
    time_limit: str = "01:00:00"
    # Shell lines run before training on every start (module loads, activating an environment). The
    # profile is the cluster admin's file, so these are code by design; job specs cannot add any.
    setup: list[str] = field(default_factory=list)
    # The interpreter that has megacore installed, as seen from the compute nodes (default: this one).
    python: str = ""
    # srun options for a container runtime, e.g. ["--container-image=/images/megacore.sqsh"] (pyxis).
    container: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class JobSpec:
    name: str = "megacore"
    cluster: str = "local"
    nodes: int = 1
    config: str = "configs/tiny.yaml"
    overrides: list[str] = field(default_factory=list)
    # Time limit for this job (default: the profile's), and seconds of warning before it: Slurm signals
    # the batch script, which asks the trainer to checkpoint at the next step and requeues the job.
    time_limit: str = ""
    signal_grace_s: int = 120
    # Requeues after a preemption or time-limit stop, and torchrun restarts after a failed rank.
    max_requeues: int = 3
    max_restarts: int = 0
    # A sweep: one array task per entry, each a list of extra overrides (its run_dir gets the index).
    sweep: list[list[str]] = field(default_factory=list)
    # Start after these job ids have completed successfully (a chain of stages).
    after: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # Names of variables the job takes from the submitting shell (secrets such as WANDB_API_KEY): only the
    # names are written into the script, which warns at start when one is not set; sbatch passes the
    # values on, and megacore writes them nowhere.
    pass_env: list[str] = field(default_factory=list)


def load_job(path: str | Path) -> tuple[JobSpec, ClusterProfile]:
    job = load_dataclass(JobSpec, path)
    profile_path = Path(job.cluster) if job.cluster.endswith((".yaml", ".yml")) else CLUSTERS / f"{job.cluster}.yaml"
    if not profile_path.is_file():
        known = ", ".join(sorted(p.stem for p in CLUSTERS.glob("*.yaml")))
        raise ConfigError(f"{path}: cluster {job.cluster!r}: no profile {profile_path} (known: {known})")
    profile = load_dataclass(ClusterProfile, profile_path)
    validate(job, profile, str(path), str(profile_path))
    return job, profile


def validate(job: JobSpec, profile: ClusterProfile, job_file: str = "job", profile_file: str = "profile") -> None:
    if not _NAME.match(job.name):
        raise ConfigError(f"{job_file}: name={job.name!r}: job names may hold letters, digits, '.', '_', '-'")
    for where, obj, keys in ((job_file, job, ("time_limit",)),
                             (profile_file, profile, ("partition", "account", "qos", "mem", "time_limit"))):
        for key in keys:
            if not PLAIN.match(getattr(obj, key)):
                raise ConfigError(f"{where}: {key}={getattr(obj, key)!r} goes into an #SBATCH directive: "
                                  f"no spaces, quotes or shell characters")
    for key in ("nodes", "signal_grace_s"):
        if getattr(job, key) < 1:
            raise ConfigError(f"{job_file}: {key} must be >= 1, got {getattr(job, key)}")
    for key in ("max_requeues", "max_restarts"):
        if getattr(job, key) < 0:
            raise ConfigError(f"{job_file}: {key} must be >= 0, got {getattr(job, key)}")
    if profile.procs_per_node < 1:
        raise ConfigError(f"{profile_file}: procs_per_node must be >= 1, got {profile.procs_per_node}")
    for dep in job.after:
        if not dep.isdigit():
            raise ConfigError(f"{job_file}: after: {dep!r} is not a job id")
    for where, env in ((job_file, job.env), (profile_file, profile.env)):
        for name, value in env.items():
            if not _ENV_NAME.match(name):
                raise ConfigError(f"{where}: env: {name!r} is not a valid environment variable name")
            if looks_secret(name, str(value)):
                raise ConfigError(f"{where}: env: {name} looks like a secret, and env values are written into the "
                                  f"batch script; export it in the shell that runs `megacore launch submit` and "
                                  f"name it in pass_env instead (sbatch passes the environment on; megacore "
                                  f"writes only the name)")
    for name in job.pass_env:
        if not _ENV_NAME.match(name):
            raise ConfigError(f"{job_file}: pass_env: {name!r} is not a valid environment variable name")
    # The layout must run on the ranks the job asks for: refused at render, naming the numbers.
    world = job.nodes * profile.procs_per_node
    for extra in job.sweep or [[]]:
        try:
            Layout.resolve(training_config(job, extra), world)
        except ConfigError as e:
            raise ConfigError(f"{job_file}: nodes={job.nodes} x procs_per_node={profile.procs_per_node} (from "
                              f"{profile_file}) = {world} ranks: {e}") from None


def training_config(job: JobSpec, extra: list[str] = ()):
    try:
        return load_config(job.config, [*job.overrides, *extra])
    except ConfigError as e:
        raise ConfigError(f"job {job.name}: {e}") from None

