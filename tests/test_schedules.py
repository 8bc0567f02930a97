"""Learning-rate schedules: cosine, warmup-stable-decay (linear and 1-sqrt decay) and constant, each as
defined; a WSD run extended on resume keeps its past, and an annealing branch starts from a stable-phase
checkpoint of another run in a new run directory that records where it came from."""

import json
import math

import pytest

from megacore.config import ConfigError, OptimConfig, load_config
from megacore.train.optim import lr_at
from tests.helpers import REPO, megacore, read_metrics, tiny_run_args


def _cfg(**kw) -> OptimConfig:
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, **kw)
    cfg.validate()
    return cfg


def test_wsd_is_warmup_then_constant_then_a_decay_over_its_last_steps():
    linear = _cfg(schedule="wsd", decay_steps=20)
    assert [lr_at(s, linear, 100) for s in (1, 5, 10)] == [0.1, 0.5, 1.0]
    assert all(lr_at(s, linear, 100) == 1.0 for s in range(10, 81))  # stable through step 80
    for step in range(81, 101):  # then down to lr x min_lr_ratio at the last step
        assert lr_at(step, linear, 100) == pytest.approx(1.0 - 0.9 * (step - 80) / 20)
    assert lr_at(100, linear, 100) == pytest.approx(0.1)
    sqrt = _cfg(schedule="wsd", decay_fraction=0.25, decay_shape="1-sqrt")  # 25 of 100 steps
    assert lr_at(75, sqrt, 100) == 1.0
    for step in (76, 90, 100):
        assert lr_at(step, sqrt, 100) == pytest.approx(1.0 - 0.9 * math.sqrt((step - 75) / 25))


def test_extending_a_wsd_run_leaves_every_stable_step_as_it_was():
    cfg = _cfg(schedule="wsd", decay_fraction=0.2)
    short, longer = [lr_at(s, cfg, 100) for s in range(1, 81)], [lr_at(s, cfg, 200) for s in range(1, 81)]
    assert short == longer  # (the cosine schedule would have changed every step after warmup)
    cosine = _cfg()
    assert [lr_at(s, cosine, 100) for s in range(11, 81)] != [lr_at(s, cosine, 200) for s in range(11, 81)]


def test_constant_and_cosine_are_as_defined():
    assert [lr_at(s, _cfg(schedule="constant"), 50) for s in (5, 11, 50)] == [0.5, 1.0, 1.0]
    cosine = _cfg()
    assert lr_at(55, cosine, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, cosine, 100) == pytest.approx(0.1)


def test_bad_schedule_values_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="optim.decay_fraction"):
        load_config(REPO / "configs/tiny.yaml", ["optim.schedule=wsd", "optim.decay_fraction=1.5"])
    with pytest.raises(ConfigError, match="optim.decay_shape"):
        load_config(REPO / "configs/tiny.yaml", ["optim.decay_shape=cubic"])


WSD = ["optim.schedule=wsd", "optim.decay_steps=3", "optim.warmup_steps=2", "checkpoint.every=2",
       "checkpoint.keep_last=10", "train.eval_every=1000", "optim.lr=1e-3", "optim.min_lr_ratio=0.1"]


@pytest.fixture(scope="module")
def wsd_run(short_documents, tmp_path_factory):
    """A 2-rank WSD run of 10 steps (stable through step 7), uninterrupted."""
    run = tmp_path_factory.mktemp("wsd") / "full"
    megacore("train", *tiny_run_args(short_documents, run, *WSD, "train.steps=10"), "--nproc", "2")
    return run


def test_a_wsd_run_extended_on_resume_has_the_steps_it_had(wsd_run, short_documents, tmp_path):
    """Planned for 6 steps (decaying over the last 2) and stopped at 4, still stable, then resumed with
    train.steps=10: every step equals the run planned for 10 from the start, bit for bit."""
    run = tmp_path / "extended"
    megacore("train", *tiny_run_args(short_documents, run, *WSD, "train.steps=6", "optim.decay_steps=2",
                                     "train.stop_after=4"), "--nproc", "2")
    megacore("train", *tiny_run_args(short_documents, run, *WSD, "train.steps=10"), "--resume", "auto",
             "--nproc", "2")
    full, extended = read_metrics(wsd_run), read_metrics(run)
    for step in range(1, 11):
        assert extended[step]["loss"] == full[step]["loss"] and extended[step]["lr"] == full[step]["lr"], step


def test_an_annealing_branch_starts_from_the_chosen_checkpoint_and_records_it(wsd_run, short_documents, tmp_path):
    """From the uninterrupted run's step-4 checkpoint (stable phase), a decay over 2 steps in a new run
    directory: it starts at step 5 with that checkpoint's weights, data position and optimizer state (its
    first loss is the source run's step 5 loss), decays to lr x min_lr_ratio, and names its origin; a
    requeue before its first checkpoint continues from there too."""
    source = wsd_run / "checkpoints" / "step_00000004"
    branch = tmp_path / "anneal"
    args = tiny_run_args(short_documents, branch, *WSD, "train.steps=6", "optim.decay_steps=2",
                         "checkpoint.every=100")
    proc = megacore("train", *args, "--resume", str(source), "--nproc", "2")
    assert f"branching from {source.resolve()} (step 4)" in proc.stdout
    assert json.loads((branch / "branch.json").read_text()) == {"from": str(source.resolve()), "step": 4}
    ours, theirs = read_metrics(branch), read_metrics(wsd_run)
    assert sorted(ours) == [5, 6]
    assert ours[5]["loss"] == theirs[5]["loss"]  # (the same weights and batch; the lr acts after the loss)
    assert ours[5]["lr"] == pytest.approx(1e-3 * (1 - 0.9 * 0.5))
    assert ours[6]["lr"] == pytest.approx(1e-3 * 0.1)
    assert ours[6]["loss"] != theirs[6]["loss"]  # (the decayed lr moved the weights differently)
    # With no checkpoint of its own yet (it saves only at its end here), `--resume auto` continues the branch.
    (branch / "checkpoints" / "step_00000006").rename(branch / "set_aside")
    again = megacore("train", *args, "--resume", "auto", "--nproc", "2")
    assert "resumed from" in again.stdout and str(source.resolve()) in again.stdout


def test_a_branch_is_told_from_a_resume_through_symlinks_and_blocks_a_fresh_start(tmp_path):
    """A run's checkpoints on other storage (a symlinked checkpoints/) are still the run's; a branch directory
    refuses `--resume none` (it would start over a branch), naming branch.json."""
    from megacore.checkpoint.resume import is_branch, record_branch, resume_candidates
    from megacore.config import Config

    def config(run_dir):
        cfg = Config()
        cfg.train.run_dir = str(run_dir)
        return cfg

    scratch, run = tmp_path / "scratch", tmp_path / "run"
    (scratch / "step_00000004").mkdir(parents=True)
    run.mkdir()
    (tmp_path / "other").mkdir()
    (run / "checkpoints").symlink_to(scratch)
    assert not is_branch(run / "checkpoints" / "step_00000004", config(run))
    assert is_branch(run / "checkpoints" / "step_00000004", config(tmp_path / "other"))
    record_branch(run / "checkpoints" / "step_00000004", 4, tmp_path / "other")
    with pytest.raises(FileExistsError, match="branch.json"):
        resume_candidates(config(tmp_path / "other"), "none")
