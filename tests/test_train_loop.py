"""The training loop as a user sees it: a global batch without targets (prompt tokens only) is skipped and
counted, not a NaN; the console line is short and starts with the ETA. Real `megacore` processes."""

import json
import random

import numpy as np
import pytest

from tests.helpers import megacore, read_metrics

pytestmark = pytest.mark.processes


def test_a_global_batch_without_targets_is_skipped_and_counted(tmp_path, data_dir, tiny_args):
    # Long prompts with one-word replies: many 2-sequence global batches hold prompt tokens only.
    rng = random.Random(4)
    words = "thou art more lovely and more temperate rough winds do shake the darling buds of may".split()
    pairs = [{"prompt": " ".join(rng.choice(words) for _ in range(50)), "response": rng.choice(words)}
             for _ in range(120)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    chat = tmp_path / "chat"
    megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={chat}", "data.format=chat",
             f"data.sources=[{tmp_path / 'pairs.jsonl'}]", f"data.tokenizer_from={data_dir}", "data.val_fraction=0.2")
    megacore("train", *tiny_args("run", f"data.dir={chat}", "train.global_batch_size=2", "train.micro_batch_size=1",
                                 "train.steps=12", "train.eval_every=12", "train.eval_batches=4"), "--nproc", "2")
    train = read_metrics(tmp_path / "run")
    assert sorted(train) == list(range(1, 13))
    assert train[12]["skipped_batches"] > 0
    trained = [s for s in train if train[s]["tokens_per_s"] > 0 and np.isfinite(train[s]["loss"])]
    assert trained and all(train[s]["loss"] > 0 for s in trained)


def test_the_console_line_is_short_and_starts_with_the_eta(tiny_args):
    out = megacore("train", *tiny_args("run", "train.steps=4", "train.eval_every=4")).stdout
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 5 and all(len(line) <= 100 for line in lines), lines
    assert lines[1].split(" | ")[1].startswith("eta "), lines[1]
    assert "val loss" in lines[-1] and "bpb" in lines[-1]
