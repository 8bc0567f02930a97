"""Supervised fine-tuning on real chats (chitchat-dataset): only response tokens are trained, packing keeps
the masks right, a fine-tune lowers the response loss on held-out chats, and a two-stage run (pretrain ->
SFT) resumes exactly within its stage."""

import json

import numpy as np
import pytest

from data_pipeline.examples import main as examples
from data_pipeline.loader import IGNORE_INDEX, PackedLoader, TokenStore
from data_pipeline.tokenizer import Tokenizer
from tests.helpers import REPO, assert_same_weights, megacore, read_metrics, tiny_run_args

CHITCHAT = REPO / ".cache" / "downloads" / "chitchat_dataset-0.9.0-py3-none-any.whl"


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, data_dir):
    """3,000 consecutive-turn pairs, prepared with the pretraining data's tokenizer."""
    if not CHITCHAT.is_file():
        pytest.fail(f"{CHITCHAT} is missing: `make test` downloads it (pip download --no-deps chitchat-dataset==0.9.0)")
    root = tmp_path_factory.mktemp("chat")
    examples(["chitchat", str(CHITCHAT), str(root / "pairs.jsonl"), "--max-pairs", "3000"])
    megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={root / 'sft'}", "data.format=chat",
             f"data.sources=[{root / 'pairs.jsonl'}]", f"data.tokenizer_from={data_dir}", "data.val_fraction=0.1")
    return root / "sft"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("pretrain") / "run"
    megacore("train", *tiny_run_args(data_dir, run), "train.steps=30",
             "train.eval_every=1000", "checkpoint.every=1000")
    return run


def _expected_weights(tokens: np.ndarray, sp) -> np.ndarray:
    """1 inside assistant turns (content and their <|end|>), 0 elsewhere, -1 before the first role token."""
    role = {sp.piece_to_id(f"<|{r}|>"): r for r in ("system", "user", "assistant")}
    end, eos = sp.piece_to_id("<|end|>"), sp.eos_id()
    out, state = np.full(len(tokens), -1), None
    for i, t in enumerate(tokens):
        if t in role:
            state, out[i] = role[t], 0
        elif t == eos:
            state, out[i] = None, 0
        elif state is not None:
            out[i] = 1 if state == "assistant" else 0
            if t == end:
                state = None
    return out


def test_only_response_tokens_are_targets_in_packed_batches(chat_dir):
    sp = Tokenizer(chat_dir / "tokenizer.model").sp
    loader = PackedLoader(TokenStore(chat_dir, "train"), 256, 16, seed=1)
    checked = trained = 0
    for _ in range(4):
        batch = loader.next_batch()
        raw = loader.streams[0].windows(batch["sample_ids"][:, 1].numpy())  # the packed tokens, unmasked
        for tokens, labels in zip(raw, batch["labels"].numpy()):
            weights = _expected_weights(tokens, sp)[1:]
            known = weights >= 0
            assert np.all((labels[known] == IGNORE_INDEX) == (weights[known] == 0))
            assert np.all(labels[known & (weights == 1)] == tokens[1:][known & (weights == 1)])
            checked += int(known.sum())
            trained += int((weights == 1).sum())
    assert checked > 10_000 and 0.2 < trained / checked < 0.8, (checked, trained)


def test_fine_tuning_lowers_response_loss_on_held_out_chats(chat_dir, pretrained, tmp_path):
    def response_loss(run):
        out = megacore("eval", run, "--data-dir", chat_dir, "--batches", "6", "--batch-size", "8").stdout
        return json.loads(out.splitlines()[-1])["loss"]

    sft = tmp_path / "sft"
    data_dir = json.loads((pretrained / "checkpoints").glob("*/meta.json").__next__().read_text())["config"]["data"]["dir"]
    megacore("train", *tiny_run_args(chat_dir, sft),
             f"train.init_from={pretrained}", "train.steps=40", "optim.lr=3e-3", "train.eval_every=20",
             f"train.eval_sets=[shakespeare={data_dir}]", "checkpoint.every=1000")
    before, after = response_loss(pretrained), response_loss(sft)
    assert after < before - 0.3, (before, after)
    # Periodic evaluation on the chat val split and on a second named set, with next-token accuracy.
    val, other = read_metrics(sft, "val"), read_metrics(sft, "val_shakespeare")
    assert sorted(val) == sorted(other) == [20, 40]
    assert 0 < val[20]["accuracy"] < val[40]["accuracy"] < 1


def test_two_stage_run_resumes_exactly_within_the_sft_stage(chat_dir, pretrained, tmp_path):
    def sft(name, *extra, resume="none"):
        return megacore("train", *tiny_run_args(chat_dir, tmp_path / name),
                        f"train.init_from={pretrained}", "train.steps=8", "train.eval_every=1000",
                        "checkpoint.every=4", *extra, "--resume", resume)

    straight = sft("straight")
    assert "initialised weights from" in straight.stdout
    sft("split", "train.stop_after=4")
    resumed = sft("split", resume="auto")
    assert "resumed from" in resumed.stdout and "initialised weights" not in resumed.stdout
    assert_same_weights(tmp_path / "straight", tmp_path / "split")


def test_eval_on_a_raw_text_file_reports_loss_perplexity_bpb_and_accuracy(pretrained, tmp_path):
    # A real passage of Hamlet (kept with the format fixture): text like what the model was trained on.
    text = tmp_path / "speech.txt"
    text.write_text((REPO / "tests" / "fixtures" / "run_a02a75f" / "hamlet.txt").read_text()[:4000])
    result = json.loads(megacore("eval", pretrained, "--text", text, "--batch-size", "2").stdout.splitlines()[-1])
    assert result["tokens"] > 500 and 0 < result["accuracy"] <= 1
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]), rel=1e-6) and result["bits_per_byte"] > 0


def test_early_stop_ends_the_run_with_a_checkpoint_when_val_loss_stops_improving(data_dir, tmp_path):
    # A learning rate so small that no weight changes in fp32: the val loss never improves on the first
    # evaluation's, whatever the initial weights and data order.
    proc = megacore("train", *tiny_run_args(data_dir, tmp_path / 'run'),
                    "train.steps=40", "optim.lr=1e-30", "optim.warmup_steps=0", "train.eval_every=2",
                    "train.early_stop_patience=2", "checkpoint.every=1000")
    assert "early stop at step" in proc.stdout
    stopped = int(proc.stdout.split("early stop at step ")[1].split(":")[0])
    assert stopped == 6 and sorted(read_metrics(tmp_path / "run"))[-1] == stopped
    assert (tmp_path / "run" / "checkpoints" / f"step_{stopped:08d}").is_dir()
    assert not (tmp_path / "run" / "PREEMPTED").exists(), "an early stop is no preemption: nothing to requeue"


def test_generate_answers_one_chat_turn_and_refuses_a_stop_that_is_no_token(pretrained):
    reply = megacore("generate", pretrained, "--chat", "--prompt", "Hi! How are you?", "--max-new-tokens", "8",
                     "--temperature", "0")
    assert "<|assistant|>" not in reply.stdout and "Hi! How are you?" not in reply.stdout, "only the reply is printed"
    refused = megacore("generate", pretrained, "--stop", "not one token", check=False)
    assert refused.returncode == 2 and "--stop" in refused.stderr
