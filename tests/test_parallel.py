"""3-D parallelism on CPU with gloo: every layout trains to the same losses as one process (fp32, fixed
seed, 10 steps), and impossible layouts are refused before any process starts, naming the values."""

import json

import pytest

from megacore.config import ConfigError, load_config
from megacore.parallel.estimate import estimate
from megacore.parallel.layout import Layout
from megacore.run_dir import load_run_config
from tests.helpers import REPO, megacore, read_metrics, tiny_run_args

STEPS = ["train.steps=10", "checkpoint.every=100", "train.eval_every=10", "model.n_layers=4"]

LAYOUTS = {
    "dp2": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    "fsdp2": (2, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2_gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "pp2_interleaved_1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"]),
    "pp2_interleaved_zb": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_zb"]),
    "tp2_full_ac": (2, ["parallel.tp=2", "parallel.activation_checkpointing=full"]),
    "fsdp2_tp2": (4, ["parallel.tp=2"]),
    "hsdp2x2_selective_ac": (4, ["parallel.dp_replicate=2", "parallel.activation_checkpointing=selective"]),
    "pp2_tp2": (4, ["parallel.pp=2", "parallel.tp=2"]),
    "pp2_fsdp2_reshard_always": (4, ["parallel.pp=2", "parallel.fsdp_reshard=always"]),
    "pp2_tp2_dp2": (8, ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=interleaved_1f1b",
                        "train.micro_batch_size=1"]),
}


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    megacore("train", *tiny_run_args(data_dir, run), *STEPS)
    return read_metrics(run), read_metrics(run, "val")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if LAYOUTS[n][0] == 8 else n
                                  for n in LAYOUTS])
def test_layout_matches_single_process(name, baseline, tiny_args, tmp_path):
    nproc, overrides = LAYOUTS[name]
    args = tiny_args(name, *STEPS, *overrides)
    megacore("train", *args, "--nproc", str(nproc), timeout=600)
    run = tmp_path / name
    train, val = read_metrics(run), read_metrics(run, "val")
    ref_train, ref_val = baseline
    for step in range(1, 11):
        assert train[step]["loss"] == pytest.approx(ref_train[step]["loss"], rel=1e-5), (name, step)
        assert train[step]["grad_norm"] == pytest.approx(ref_train[step]["grad_norm"], rel=1e-4), (name, step)
    assert val[10]["loss"] == pytest.approx(ref_val[10]["loss"], rel=1e-5)

    # The estimator's bytes per rank equal the real local shards the run measured after its first step.
    measured = json.loads((run / "memory.json").read_text())["ranks"]
    predicted = estimate(load_run_config(run), nproc)["ranks"]
    for real, est in zip(measured, predicted):
        for key in ("parameters", "gradients", "optimizer"):
            assert real[key] == est[key], (name, real["rank"], key)


def _check(world: int, *overrides: str) -> None:
    Layout.resolve(load_config(REPO / "configs/tiny.yaml", list(overrides)), world)


@pytest.mark.parametrize("world, overrides, named", [
    (2, ["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=1"],
     "parallel.pp=2 x dp_replicate=1 x dp_shard=1 x tp=2 = 4, but the world size is 2"),
    (3, ["parallel.tp=2"], "world size 3 is not divisible"),
    (4, ["parallel.tp=4", "model.n_kv_heads=2"], "parallel.tp=4 must divide model.n_heads=8 and model.n_kv_heads=2"),
    (2, ["parallel.tp=2", "model.n_heads=6", "model.n_kv_heads=3", "model.dim=192"], "model.n_heads=6"),
    (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=3",
         "model.n_layers=4"], "6 pipeline stages, more than model.n_layers=4"),
    (4, ["parallel.pp=4", "parallel.pp_schedule=interleaved_1f1b", "model.n_layers=8",
         "train.micro_batch_size=8"], "needs at least parallel.pp=4 micro-batches"),
    (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.pp_stages_per_rank=2"], "interleaved schedule"),
])
def test_bad_layouts_are_refused_naming_the_values(world, overrides, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        _check(world, *overrides)


def test_cli_refuses_a_bad_layout_before_starting_processes():
    proc = megacore("train", "configs/tiny.yaml", "--nproc", "2", "parallel.tp=2", "parallel.pp=2", check=False)
    assert proc.returncode == 2
    assert "parallel.tp=2" in proc.stderr and "parallel.pp=2" in proc.stderr
    assert "torch.distributed.run" not in proc.stderr


def test_estimate_command_prints_parameters_flops_and_memory_per_rank(data_dir, tmp_path):
    out = megacore("estimate", "configs/tiny.yaml", f"data.dir={data_dir}", "parallel.tp=2", "--world-size", "4",
                   "--json").stdout
    est = json.loads(out)
    assert est["layout"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 2, "ep": 1}
    assert len(est["ranks"]) == 4 and est["parameters"] > 0 and est["flops_per_token"] > 0
    # Sharded 4 ways, each rank holds about a quarter of the fp32 weights.
    assert est["ranks"][0]["parameters"] == pytest.approx(4 * est["parameters"] / 4, rel=0.05)
    dry = megacore("train", *tiny_run_args(data_dir, tmp_path / "run"), "--nproc", "2", "--dry-run").stdout
    assert "layout: pp 1 x dp_replicate 1 x dp_shard 2 x cp 1 x tp 1" in dry and "layout ok" in dry


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(baseline, tiny_args, tmp_path):
    megacore("train", *tiny_args("compiled", *STEPS, "parallel.compile=true"), "--nproc", "2", timeout=600)
    train = read_metrics(tmp_path / "compiled")
    for step in range(1, 11):
        # Fused kernels round differently; the trajectory stays the same to 1e-4.
        assert train[step]["loss"] == pytest.approx(baseline[0][step]["loss"], rel=1e-4), step


def test_bf16_mixed_precision_tracks_fp32(baseline, tiny_args, tmp_path):
    # bf16 compute with fp32 master weights and fp32 gradient reduction (FSDP's policy on 2 ranks).
    megacore("train", *tiny_args("bf16", *STEPS, "train.mixed_precision=bf16"), "--nproc", "2", timeout=600)
    train = read_metrics(tmp_path / "bf16")
    for step in range(1, 11):
        assert train[step]["loss"] == pytest.approx(baseline[0][step]["loss"], rel=2e-2), step
    assert train[10]["loss"] < train[1]["loss"]


DOC_STEPS = ["train.steps=6", "checkpoint.every=100", "train.eval_every=6", "model.n_layers=4",
             "model.document_masking=true"]


@pytest.mark.processes
def test_document_masking_trains_alike_on_one_rank_tp2_and_pp2(short_documents, tmp_path):
    """Packed short documents: tensor- and pipeline-parallel runs give the losses of one process (whose
    attention tests/test_fast_path.py checks against the dense mask)."""
    runs = {}
    for name, nproc, extra in (("single", 1, []), ("tp2", 2, ["parallel.tp=2"]), ("pp2", 2, ["parallel.pp=2"])):
        run = tmp_path / name
        megacore("train", *tiny_run_args(short_documents, run, *DOC_STEPS, *extra), "--nproc", str(nproc), timeout=600)
        runs[name] = read_metrics(run), read_metrics(run, "val")
    (ref_train, ref_val) = runs["single"]
    for name in ("tp2", "pp2"):
        train, val = runs[name]
        for step in range(1, 7):
            assert train[step]["loss"] == pytest.approx(ref_train[step]["loss"], rel=1e-5), (name, step)
            assert train[step]["grad_norm"] == pytest.approx(ref_train[step]["grad_norm"], rel=1e-4), (name, step)
        assert val[6]["loss"] == pytest.approx(ref_val[6]["loss"], rel=1e-5), name
