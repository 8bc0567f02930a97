"""Real distributed training under torchrun (gloo, 2 CPU ranks): the run directory, falling validation
loss, layout-independent losses, honest throughput, and eval, generate and plot on the result. (Stop
and resume: tests/test_checkpoint.py.)"""

import json
import math
import os
import statistics

import pytest

from megacore.checkpoint.meta import read_meta
from megacore.checkpoint.store import list_checkpoints
from tests.helpers import megacore, read_metrics, tiny_run_args


@pytest.fixture(scope="module")
def two_rank_run(data_dir, tmp_path_factory):
    """30 steps on 2 FSDP ranks, evaluated and checkpointed every 10, steps 12-13 profiled."""
    run = tmp_path_factory.mktemp("train") / "run"
    # peak_tflops=0: MFU against a matmul peak measured on each rank at start.
    proc = megacore("train", *tiny_run_args(data_dir, run, "train.steps=30", "train.eval_every=10",
                                            "checkpoint.every=10", "checkpoint.keep_last=2", "optim.lr=3e-3",
                                            "train.peak_tflops=0", "logging.profile_start=12",
                                            "logging.profile_steps=2"), "--nproc", "2")
    return run, proc.stdout


def test_run_directory_holds_config_tokenizer_and_every_step(two_rank_run):
    run, _ = two_rank_run
    assert (run / "config.yaml").is_file() and (run / "tokenizer.model").is_file()
    train = read_metrics(run)
    assert sorted(train) == list(range(1, 31))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(train[30])
    assert 0 < train[30]["mfu"] < 1, "against the measured peak"


def test_validation_loss_falls_and_perplexity_is_its_exponential(two_rank_run):
    run, _ = two_rank_run
    val = read_metrics(run, "val")
    assert sorted(val) == [10, 20, 30]
    assert val[30]["loss"] < val[10]["loss"] < math.log(512)
    assert val[30]["perplexity"] == pytest.approx(math.exp(val[30]["loss"]))


def test_newest_checkpoints_are_kept_with_the_data_position_and_config(two_rank_run):
    run, stdout = two_rank_run
    # keep_last=2: step 10 was pruned; the newest holds the data position and the resolved config.
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step_00000020", "step_00000030"]
    meta = read_meta(ckpts[-1])
    assert meta.step == 30 and meta.world_size == 2 and meta.config["train"]["steps"] == 30
    assert meta.loader["consumed_samples"] + meta.loader["epoch"] > 0
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert "saved checkpoint" in stdout


def test_each_rank_gets_its_share_of_the_cores(two_rank_run):
    # --nproc shares the cores out: each rank gets cores / ranks threads, not torchrun's default of one.
    _, stdout = two_rank_run
    assert f"({max(1, len(os.sched_getaffinity(0)) // 2)} CPU threads each)" in stdout


def test_profiled_steps_leave_a_trace_per_rank_and_the_communication_share(two_rank_run):
    # Steps 12-13 ran under torch.profiler: a Perfetto trace per rank, and how much time went to FSDP's
    # collectives on each rank (never all of it, never none on 2 ranks).
    run, stdout = two_rank_run
    assert "profiled steps [12, 13]: communication" in stdout and "host syncs per step" in stdout
    summary = json.loads((run / "profile/summary.json").read_text())["ranks"]
    assert [r["rank"] for r in summary] == [0, 1]
    for r in summary:
        assert r["steps"] == [12, 13] and 0 < r["communication_s"] < r["wall_s"]
        assert 0 < r["communication_share"] < 1 and "aten::mm" in r["top_self_time_s"]
        # Host syncs over the profiled window (steps that neither log nor evaluate): the train steps make
        # none (tests/test_fast_path.py counts them exactly); at most one read between steps remains.
        assert r["host_syncs_per_step"] <= 1 and r["host_syncs"] <= 2
        trace = json.loads((run / f"profile/rank{r['rank']}.trace.json").read_text())
        assert any(e.get("name", "").startswith("gloo:") for e in trace["traceEvents"])


def test_eval_of_the_two_rank_checkpoint_on_one_process(two_rank_run):
    run, _ = two_rank_run
    # DCP reshards the 2-rank checkpoint into one process.
    result = json.loads(megacore("eval", run, "--batches", "4").stdout.strip().splitlines()[-1])
    assert set(result) >= {"loss", "perplexity", "bits_per_byte"}
    assert 0 < result["bits_per_byte"] < 8


def test_generate_continues_the_prompt(two_rank_run):
    run, _ = two_rank_run
    out = megacore("generate", run, "--prompt", "KING.", "--max-new-tokens", "20").stdout
    assert out.startswith("KING.") and len(out) > len("KING.")


def test_plot_draws_the_logged_series(two_rank_run):
    from PIL import Image

    run, _ = two_rank_run
    png = megacore("plot", run).stdout.strip()
    assert png.endswith(".png")
    # The drawn curves (stored in the PNG by megacore plot, read from the lines it drew) are the JSONL's.
    train, val = read_metrics(run), read_metrics(run, "val")
    drawn = json.loads(Image.open(png).text["megacore:series"])
    assert drawn["train loss"] == [list(train), [train[s]["loss"] for s in train]]
    assert drawn["val loss"] == [[10, 20, 30], [val[s]["loss"] for s in (10, 20, 30)]]
    assert drawn["lr (cosine)"][1] == [train[s]["lr"] for s in train]  # (the label names the schedule)
    assert drawn["tokens/s"][1] == [train[s]["tokens_per_s"] for s in train]


def test_one_rank_and_two_rank_fsdp_give_the_same_losses(tiny_args, tmp_path):
    common = ["train.steps=6", "checkpoint.every=100", "train.eval_every=100"]
    megacore("train", *tiny_args("single", *common))
    megacore("train", *tiny_args("fsdp", *common), "--nproc", "2")
    single, fsdp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "fsdp")
    for step in range(1, 7):
        assert fsdp[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-5), step


def test_tokens_per_s_after_an_eval_or_a_save_is_the_speed_of_training(tiny_args, tmp_path):
    # eval_every=3 does not divide checkpoint.every=4; each evaluation (32 batches) takes several steps' time.
    megacore("train", *tiny_args("speed", "train.steps=12", "train.eval_every=3", "train.eval_batches=32",
                                 "checkpoint.every=4", "checkpoint.keep_last=1"))
    train = read_metrics(tmp_path / "speed")
    gaps = {s: train[s]["time"] - train[s - 1]["time"] for s in range(3, 13)}
    after_eval, after_save = [4, 7, 10], [5, 9]
    plain = [s for s in range(3, 13) if s not in after_eval + after_save]
    median = statistics.median
    assert median(gaps[s] for s in after_eval) > 3 * median(gaps[s] for s in plain), "an evaluation outlasts 3 steps"
    typical = median(train[s]["tokens_per_s"] for s in plain)
    for steps in (after_eval, after_save):
        # Counting the evaluation in would give a fraction of `typical` (about 1/5 here).
        assert median(train[s]["tokens_per_s"] for s in steps) > 0.6 * typical, (steps, typical, train)


def test_communication_time_counts_overlapping_collectives_once():
    # Two collectives in flight together on one rank are one stretch of communication, not two.
    from megacore.monitor.profiling import union_seconds

    assert union_seconds([(0.0, 1.0), (0.5, 2.0), (3.0, 3.5), (3.1, 3.2)]) == pytest.approx(2.5)
    assert union_seconds([]) == 0.0
