"""Context parallelism (parallel.cp) on CPU with gloo: every layout with cp gives the logits, loss and every
gradient of one process on packed windows (document masking kept exact), no document sees another, runs
train to the losses of one process and resume on another cp, and bad layouts are refused before launch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megacore.config import ConfigError, load_config
from megacore.parallel.context_parallel import sequence_order, shard_sequence, unshard_sequence
from megacore.parallel.estimate import estimate
from megacore.parallel.layout import Layout
from megacore.run_dir import load_run_config
from tests.helpers import REPO, failure_message, megacore, read_metrics, tiny_run_args

# Sharding ------------------------------------------------------------------------------------------------


def test_head_tail_sharding_gives_each_rank_one_early_and_one_late_chunk_and_unshards_exactly():
    seq = torch.arange(16)[None]
    shards = [shard_sequence(seq, 4, r) for r in range(4)]
    assert shards[0].tolist() == [[0, 1, 14, 15]] and shards[3].tolist() == [[6, 7, 8, 9]]
    assert sequence_order(16, 4).tolist() == torch.cat(shards, dim=1)[0].tolist()
    assert torch.equal(unshard_sequence(torch.cat(shards, dim=1), 4), seq)


def test_the_cuda_block_mask_attends_like_the_cpu_pieces():
    """The FlexAttention block mask (CUDA's path) and the per-document SDPA pieces (CPU's) give each cp rank's
    queries the same output, with documents and without (FlexAttention runs forward on CPU; its backward
    does not, so this compares forward only)."""
    from torch.nn.attention.flex_attention import flex_attention

    from megacore.parallel.context_parallel import ContextParallelAttention, _attend_pieces, _GlobalLayout

    torch.manual_seed(0)
    seq, cp = 256, 2
    documents = torch.cat([torch.arange(n) for n in (40, 1, 100, 115)])
    q, k, v = torch.randn(2, 4, seq, 16), torch.randn(2, 2, seq, 16), torch.randn(2, 2, seq, 16)
    for positions in (torch.stack([documents, torch.arange(seq)]), None):
        for rank in range(cp):
            layout = _GlobalLayout(ContextParallelAttention(None, cp, rank), positions, seq, torch.device("cpu"))
            local_q = shard_sequence(q, cp, rank, dim=2)
            flex = flex_attention(local_q, k, v, block_mask=layout.block_mask(), enable_gqa=True)
            pieces = _attend_pieces(local_q, k, v, layout.pieces(2), gqa=True, dropout_p=0.0)
            torch.testing.assert_close(flex, pieces, atol=1e-5, rtol=1e-5)


# Layouts refused before any process starts ---------------------------------------------------------------


def _check(world: int, *overrides: str) -> Layout:
    return Layout.resolve(load_config(REPO / "configs/tiny.yaml", list(overrides)), world)


@pytest.mark.parametrize("world, overrides, named", [
    (4, ["parallel.cp=2", "parallel.tp=2", "data.seq_len=66"], "data.seq_len=66 must be divisible by 2 x parallel.cp=2"),
    (8, ["parallel.cp=2", "parallel.tp=4", "data.seq_len=68", "model.n_kv_heads=4"],
     "each cp rank's share of it by parallel.tp=4"),
    (2, ["parallel.cp=3"], "world size 2 is not divisible by parallel.dp_replicate=1 x parallel.tp=1 x "
                           "parallel.pp=1 x parallel.cp=3"),
    (2, ["parallel.cp=2", "parallel.backend=deepspeed"], "parallel.cp=2 with parallel.backend=deepspeed"),
    (2, ["parallel.cp=0"], "parallel.cp must be > 0"),
    (2, ["parallel.cp_regather_kv=true"], "parallel.cp_regather_kv=true needs parallel.cp > 1"),
])
def test_bad_context_parallel_layouts_are_refused_naming_the_values(world, overrides, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        _check(world, *overrides)


def test_attention_dropout_under_cp_on_cuda_is_refused_naming_the_key():
    """CUDA's CP attention is FlexAttention, which has no dropout: refused rather than silently dropped."""
    from megacore.device import check_supported

    cfg = load_config(REPO / "configs/tiny.yaml", ["parallel.cp=2", "model.dropout=0.1"])
    with pytest.raises(ConfigError, match="parallel.cp=2 on CUDA runs FlexAttention, which has no attention dropout"):
        check_supported(cfg, torch.device("cuda"))
    check_supported(cfg, torch.device("cpu"))  # (the CPU kernel applies dropout in each SDPA call)


def test_cp_ranks_read_the_same_batch_and_fsdp_shards_over_dp_shard_x_cp():
    layout = _check(8, "parallel.cp=2", "parallel.tp=2")
    assert (layout.dp_shard, layout.cp, layout.tp, layout.dp_size, layout.fsdp_size) == (2, 2, 2, 2, 4)
    coords = [layout.coordinates(r) for r in range(8)]
    assert [layout.dp_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [c["cp"] for c in coords] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [c["dp_shard_cp"] for c in coords] == [0, 0, 1, 1, 2, 2, 3, 3]


# Exactness against one process (tests/cp_probe.py) -------------------------------------------------------

# name: (processes, overrides, document masking)
PROBES = {
    "cp2": (2, ["parallel.cp=2"], True),
    "cp2_tp2": (4, ["parallel.cp=2", "parallel.tp=2"], True),
    "cp2_dp_shard2": (4, ["parallel.cp=2", "parallel.dp_shard=2"], True),
    "cp2_pp2": (4, ["parallel.cp=2", "parallel.pp=2"], True),  # (2 micro-batches of 2 rows)
    "hsdp2_cp2": (4, ["parallel.cp=2", "parallel.dp_replicate=2"], True),
    "cp2_selective_ac": (2, ["parallel.cp=2", "parallel.activation_checkpointing=selective"], True),
    "cp2_regather_kv_selective_ac": (2, ["parallel.cp=2", "parallel.cp_regather_kv=true",
                                         "parallel.activation_checkpointing=selective"], True),
    "cp2_causal_full_ac": (2, ["parallel.cp=2", "parallel.activation_checkpointing=full"], False),
}


def _probe(out, case: str, nproc: int, overrides: list[str]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "tests/cp_probe.py", str(out), case, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure_message(proc)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.processes
@pytest.mark.parametrize("name", list(PROBES))
def test_logits_loss_and_every_gradient_equal_one_process(name, tmp_path):
    """Windows with documents crossing chunk edges, one longer than two chunks, one cut at the window's start
    and 1-token documents (tests/cp_probe.py), and plain causal attention; differences relative to each
    tensor's largest value."""
    nproc, overrides, documents = PROBES[name]
    reports = _probe(tmp_path, "windows", nproc, [*overrides, f"model.document_masking={documents}"])
    grads_seen = set()
    for rank, report in enumerate(reports):
        if report["logits"] is not None:
            assert report["logits"] < 1e-5, (name, rank)
        assert report["loss"] < 1e-5, (name, rank)
        for param, diff in report["grads"].items():
            assert diff < 1e-5, (name, rank, param)
        grads_seen |= set(report["grads"])
    assert len(grads_seen) == 21, "every parameter of the 2-layer model is compared on some rank"


@pytest.mark.processes
def test_no_document_sees_another_under_cp(tmp_path):
    """Changing a token of a document that two cp ranks share moves that document's later logits and
    nothing else in the window, on either rank."""
    for rank, report in enumerate(_probe(tmp_path, "leak", 2, ["parallel.cp=2", "model.document_masking=true"])):
        assert report["inside"] > 1e-3, rank
        assert report["outside"] == 0.0, rank


# Training and resuming -----------------------------------------------------------------------------------

DOC_STEPS = ["train.steps=6", "checkpoint.every=3", "train.eval_every=6", "model.document_masking=true"]


@pytest.fixture(scope="module")
def single(short_documents, tmp_path_factory):
    run = tmp_path_factory.mktemp("cp") / "single"
    megacore("train", *tiny_run_args(short_documents, run, *DOC_STEPS))
    return read_metrics(run), read_metrics(run, "val")


def _same_losses(run, reference, steps) -> None:
    train, val = read_metrics(run), read_metrics(run, "val")
    for step in steps:
        assert train[step]["loss"] == pytest.approx(reference[0][step]["loss"], rel=1e-5), (run.name, step)
        assert train[step]["grad_norm"] == pytest.approx(reference[0][step]["grad_norm"], rel=1e-4), (run.name, step)
    assert val[6]["loss"] == pytest.approx(reference[1][6]["loss"], rel=1e-5), run.name


@pytest.mark.processes
@pytest.mark.parametrize("nproc, layout", [(2, ["parallel.cp=2"]), (4, ["parallel.cp=2", "parallel.dp_shard=2"])],
                         ids=["cp2", "cp2_dp_shard2"])
def test_packed_documents_train_to_the_losses_of_one_process(nproc, layout, single, short_documents, tmp_path):
    run = tmp_path / "run"
    proc = megacore("train", *tiny_run_args(short_documents, run, *DOC_STEPS, *layout), "--nproc", str(nproc),
                    timeout=600)
    assert "x cp 2 x tp 1" in proc.stdout  # (the layout line names cp)
    _same_losses(run, single, range(1, 7))
    # FSDP shards over dp_shard x cp: each rank's real shards are the estimator's.
    measured = json.loads((run / "memory.json").read_text())["ranks"]
    for real, est in zip(measured, estimate(load_run_config(run), nproc)["ranks"], strict=True):
        for key in ("parameters", "gradients", "optimizer"):
            assert real[key] == est[key], (real["rank"], key)


@pytest.mark.processes
@pytest.mark.parametrize("nproc, layout", [(1, ["parallel.cp=1"]), (2, ["parallel.cp=1", "parallel.dp_shard=2"])],
                         ids=["cp1", "dp2"])
def test_a_cp2_run_resumes_on_another_layout_with_the_same_losses(nproc, layout, single, short_documents, tmp_path):
    run = tmp_path / "run"
    megacore("train", *tiny_run_args(short_documents, run, *DOC_STEPS, "parallel.cp=2", "train.stop_after=3"),
             "--nproc", "2", timeout=600)
    assert (run / "checkpoints" / "step_00000003").is_dir()
    megacore("train", *tiny_run_args(short_documents, run, *DOC_STEPS, *layout), "--resume", "auto",
             "--nproc", str(nproc), timeout=600)
    _same_losses(run, single, range(1, 7))


# Memory ----------------------------------------------------------------------------------------------------

LONG = ["model.document_masking=false", "train.device=cpu", "data.seq_len=1024", "model.max_seq_len=1024",
        "model.dim=128", "train.global_batch_size=1", "train.micro_batch_size=1"]


@pytest.mark.processes
def test_activation_memory_per_rank_falls_with_cp_as_the_estimator_says(tmp_path):
    """At a fixed 1024-token sequence, what the blocks keep for the backward on each rank (measured at the
    end of the forward, the peak: tests/cp_probe.py) is the estimator's block activations within 15%, and
    falls with cp (the gathered keys and values and the CPU kernel's masks are what keeps it above 1/cp),
    further with parallel.cp_regather_kv."""
    peaks = {}
    for name, cp, extra in (("cp1", 1, []), ("cp2", 2, []), ("cp4", 4, []),
                            ("cp2_regather", 2, ["parallel.cp_regather_kv=true"])):
        reports = _probe(tmp_path / name, "memory", cp, [f"parallel.cp={cp}", *LONG, *extra])
        for rank, r in enumerate(reports):
            assert 0.85 < r["measured"] / r["estimated"] < 1.15, (name, rank, r)
        peaks[name] = max(r["measured"] for r in reports)
    assert peaks["cp2"] < 0.75 * peaks["cp1"] and peaks["cp4"] < 0.6 * peaks["cp2"], peaks
    # Re-gathering keeps only the local keys and values (and no CPU masks): closer to 1/cp.
    assert peaks["cp2_regather"] < 0.8 * peaks["cp2"], peaks
