"""Planning a cluster job on one CPU: `train --dry-run --world-size N` builds the real model and parallel
plan on the meta device for any N, and its per-rank bytes are the estimator's."""

import time

import pytest

from megacore.config import load_config
from megacore.parallel.estimate import estimate
from tests.helpers import REPO, TINY, megacore
from tests.test_parallel import LAYOUTS, STEPS


def _same_ranks(a: dict, b: dict) -> None:
    for x, y in zip(a["ranks"], b["ranks"], strict=True):
        for key in ("parameters", "gradients", "optimizer", "activations_approx"):
            assert x[key] == y[key], (x["rank"], key)


def test_70b_on_512_ranks_plans_in_seconds_and_matches_the_estimator():
    cfg = load_config(REPO / "configs/llama3_70b.yaml")
    start = time.perf_counter()
    planned = estimate(cfg, 512)  # what `train --dry-run --world-size 512` prints
    seconds = time.perf_counter() - start
    assert seconds < 60, f"{seconds:.0f} s"
    _same_ranks(planned, estimate(cfg, 512, analytic=True))
    assert planned["parameters"] == pytest.approx(70.55e9, rel=1e-3)
    # tp 8 x FSDP 64: each rank holds 1/512 of the fp32 parameters (the first ranks a row more).
    assert planned["ranks"][0]["parameters"] == pytest.approx(4 * 70.55e9 / 512, rel=0.01)


def test_dry_run_plans_a_cluster_job_without_its_data():
    proc = megacore("train", "configs/llama3_8b.yaml", "--dry-run", "--world-size", "8")
    assert "parameters: 8,030.26M" in proc.stdout and "world size 8: layout ok" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(8))
    assert float(rows[0][1]) == pytest.approx(4 * 8.03e9 / 8 / 2**30, rel=0.01)  # params GiB, FSDP over 8


CP_LAYOUTS = {"cp2": (2, ["parallel.cp=2"]), "cp2_tp2_dp2": (8, ["parallel.cp=2", "parallel.tp=2"]),
              "hsdp2_cp2": (4, ["parallel.cp=2", "parallel.dp_replicate=2", "train.micro_batch_size=1"]),
              "cp2_pp2": (4, ["parallel.cp=2", "parallel.pp=2"])}
MOE = ["model.family=qwen3_moe", "model.qk_norm=true", "model.n_experts=8", "model.n_active_experts=2",
       "model.moe_ffn_dim=64", "model.moe_dense_layers=[0]"]
# (FSDP shards the experts' rows, dim 1, where an ep rank's experts are fewer than the ranks sharding them)
EP_LAYOUTS = {"ep2": (2, [*MOE, "parallel.ep=2"]), "fsdp16_experts_dim1": (16, [*MOE, "train.global_batch_size=32"]),
              "ep2_dp_shard16_experts_dim1": (16, [*MOE, "parallel.ep=2", "train.global_batch_size=32"]),
              "ep4_dp_shard8": (8, [*MOE, "parallel.ep=4", "train.global_batch_size=16"]),
              "hsdp2_ep2": (4, [*MOE, "parallel.ep=2", "parallel.dp_replicate=2", "train.micro_batch_size=1"]),
              "pp2_ep2_dp_shard6": (12, [*MOE, "parallel.ep=2", "parallel.pp=2", "train.global_batch_size=24"])}


@pytest.mark.parametrize("name", [*LAYOUTS, *CP_LAYOUTS, *EP_LAYOUTS])
def test_the_plan_and_the_estimator_agree_on_every_layout(name):
    nproc, overrides = LAYOUTS.get(name) or CP_LAYOUTS.get(name) or EP_LAYOUTS[name]
    cfg = load_config(REPO / "configs/tiny.yaml", [*TINY, "model.vocab_size=301", *STEPS, *overrides])
    _same_ranks(estimate(cfg, nproc), estimate(cfg, nproc, analytic=True))


def test_8b_layout_is_refused_by_name_before_planning():
    proc = megacore("train", "configs/llama3_8b.yaml", "--dry-run", "--world-size", "6", check=False)
    assert proc.returncode == 2 and "train.global_batch_size=512 is not divisible" in proc.stderr
    proc = megacore("train", "configs/llama3_8b.yaml", "--world-size", "8", check=False)
    assert proc.returncode == 2 and "--world-size plans a job with --dry-run" in proc.stderr


def test_long_context_8b_needs_cp8_on_8_gpus_of_80_gb():
    """README's long-context example: Llama 3 8B at 131,072 tokens on 8 x 80 GB (selective activation
    checkpointing, bf16): without cp a rank would need several times its memory; cp=8 fits."""
    totals = {}
    for cp in (1, 8):
        cfg = load_config(REPO / "configs/llama3_8b.yaml", ["data.seq_len=131072", "model.max_seq_len=131072",
                                                            "train.global_batch_size=8", f"parallel.cp={cp}"])
        rank = estimate(cfg, 8)["ranks"][0]
        totals[cp] = sum(rank[k] for k in ("parameters", "gradients", "optimizer", "activations_approx")) / 1e9
    assert totals[1] > 4 * 80 and totals[8] < 80, totals
