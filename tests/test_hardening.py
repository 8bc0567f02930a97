"""Nothing lost, nothing stale: each test reproduces a defect that once lost or corrupted work (issue 16)
and checks the fix, with real processes where the defect involves them."""

import dataclasses
import io
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from data_pipeline.prepare import prepare
from data_pipeline.shards import read_manifest, write_shard
from megacore.checkpoint.store import list_checkpoints
from megacore.config import DataConfig, ModelConfig
from megacore.model import Llama
from megacore.parallel.activation_checkpoint import apply_activation_checkpointing
from megacore.train.loss import loss_sum
from tests.helpers import REPO, PlantedPayload, megacore, read_metrics, rewrite_manifest, tiny_run_args

NO_EVAL = ["train.eval_every=1000"]


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _train_lines(run):
    """Every train record in metrics.jsonl, in file order (a step logged twice shows twice)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


# 1. Retention and one line of history


def test_retention_keeps_the_checkpoint_just_written_when_a_newer_one_is_corrupt(tiny_args, tmp_path):
    args = tiny_args("run", "train.steps=8", "checkpoint.every=2", "checkpoint.keep_last=1", *NO_EVAL)
    megacore("train", *args)
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    _flip_a_byte(sorted((ckpts / "step_00000008").glob("*.distcp"))[0])
    proc = megacore("train", *args, "--resume", "auto", "train.stop_after=6")
    assert "skipping checkpoint step_00000008" in proc.stdout + proc.stderr
    assert "saved checkpoint" in proc.stdout and "step_00000006" in proc.stdout
    assert [p.name for p in list_checkpoints(run)] == ["step_00000006"], "the newest good checkpoint survives"
    assert megacore("checkpoints", "verify", run).returncode == 0
    # The corrupt one is kept aside, not deleted, and cannot shadow the new line.
    assert [p.name.split(".")[0] for p in (ckpts / "abandoned").iterdir()] == ["step_00000008"]
    assert not (ckpts / "latest").exists(), "no pointer that nothing reads"


def test_a_rollback_sets_newer_checkpoints_aside_and_each_step_is_logged_once(tiny_args, tmp_path):
    args = tiny_args("run", "train.steps=8", "checkpoint.every=2", "checkpoint.keep_last=0", *NO_EVAL)
    megacore("train", *args)
    run = tmp_path / "run"
    proc = megacore("train", *args, "--resume", run / "checkpoints" / "step_00000004", "train.stop_after=6")
    assert "moved step_00000006 aside" in proc.stdout and "moved step_00000008 aside" in proc.stdout
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert _train_lines(run) == list(range(1, 7)), "the rolled-back steps are not in metrics.jsonl twice"
    # A later --resume auto follows the new line, not the abandoned step 8.
    proc = megacore("train", *args, "--resume", "auto")
    assert "resumed from" in proc.stdout and "step_00000006 at step 6" in proc.stdout
    assert _train_lines(run) == list(range(1, 9))
    superseded = [json.loads(line)["step"] for line in (run / "metrics.superseded.jsonl").read_text().splitlines()]
    assert {5, 6, 7, 8} <= set(superseded), "the dead line's records are kept aside"


# 2. Dropout with activation checkpointing


def test_dropout_gradients_are_the_same_with_any_activation_checkpointing():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32, dropout=0.1)
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    grads, streams = {}, {}
    for mode in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = Llama(cfg).train()
        apply_activation_checkpointing(model, mode)
        torch.manual_seed(42)
        loss_sum(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        grads[mode] = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}
        streams[mode] = torch.get_rng_state()
    for mode in ("full", "selective"):
        for name, grad in grads["none"].items():
            assert torch.allclose(grads[mode][name], grad, atol=1e-6), (mode, name)
        assert torch.equal(streams[mode], streams["none"]), "the random stream advances as without checkpointing"


# 4. A changed source is prepared again, and a checkpoint of the old data refuses the new


def _docs(n, seed, words_per_doc=40):
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jolly kings".split()
    return [" ".join(rng.choice(words) for _ in range(words_per_doc)) + f" ({seed}-{i})" for i in range(n)]


def test_a_changed_source_is_prepared_again_and_the_old_checkpoint_refuses_it(tmp_path):
    source, data = tmp_path / "in.jsonl", tmp_path / "data"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(400, 1)))
    prep = ["data", "prepare", "configs/tiny.yaml", f"data.dir={data}", f"data.sources=[{source}]", "data.vocab_size=400"]
    megacore(*prep)
    before = read_manifest(data)["fingerprint"]
    assert "already prepared" in megacore(*prep).stdout
    train = ["train", "configs/tiny.yaml", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
             "data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=4", "train.peak_tflops=0.1",
             f"data.dir={data}", f"train.run_dir={tmp_path / 'run'}", "train.steps=4", "train.stop_after=2",
             "checkpoint.every=2", "train.eval_batches=1", *NO_EVAL]
    megacore(*train)
    with open(source, "a") as f:  # the same file, more records
        f.write("".join(json.dumps({"text": d}) + "\n" for d in _docs(100, 2)))
    out = megacore(*prep).stdout
    assert "sources changed" in out and "already prepared" not in out
    assert read_manifest(data)["fingerprint"] != before
    refused = megacore(*train, "--resume", "auto", check=False)
    assert refused.returncode == 2 and "the data changed since the checkpoint" in refused.stderr
    assert before in refused.stderr and "Traceback" not in refused.stderr


# 5. The loader verifies shards


def test_an_altered_shard_stops_every_rank_with_one_message_naming_it(prepared_copy, tiny_args):
    shard = prepared_copy / read_manifest(prepared_copy)["splits"]["train"]["shards"][0]["file"]
    _flip_a_byte(shard)
    proc = megacore("train", *tiny_args("run", f"data.dir={prepared_copy}", "train.steps=2"), "--nproc", "2",
                    check=False)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("megacore: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert str(shard) in errors[0] and "sha256" in errors[0]


def test_a_token_id_beyond_the_vocabulary_is_refused_naming_the_shard(prepared_copy, tiny_args):
    manifest = read_manifest(prepared_copy)
    record = manifest["splits"]["train"]["shards"][0]
    shard = prepared_copy / record["file"]
    vocab = manifest["tokenizer"]["vocab_size"]
    values = np.full(record["tokens"], 5, dtype=np.uint16)
    values[7] = vocab  # one id the embedding does not have
    manifest["splits"]["train"]["shards"][0] = write_shard(shard, values, np.array([record["tokens"]]))
    (prepared_copy / "manifest.json").write_text(json.dumps(manifest))
    proc = megacore("train", *tiny_args("run", f"data.dir={prepared_copy}", "train.steps=2"), check=False)
    assert proc.returncode == 2 and f"token id {vocab}" in proc.stderr and str(shard) in proc.stderr
    assert "Traceback" not in proc.stderr


# 7. Late failures are refused before any process starts


def _refused_before_start(proc, run_dir, *named):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "torch.distributed" not in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists(), "nothing was started or written"
    for text in named:
        assert text in proc.stderr, (text, proc.stderr)


def test_a_data_directory_without_a_usable_val_split_is_refused_before_start(tmp_path, tiny_args):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(300, 3, words_per_doc=8)))
    prepare(DataConfig(dir=str(tmp_path / "no_val"), sources=[str(source)], vocab_size=400, val_fraction=0.0),
            log=lambda *_: None)
    proc = megacore("train", *tiny_args("a", f"data.dir={tmp_path / 'no_val'}"), "--nproc", "2", check=False)
    _refused_before_start(proc, tmp_path / "a", "no 'val' split", "data.val_fraction")
    # A val split of a few short documents: fewer tokens than one window of seq_len + 1 = 65.
    for fraction in (0.005, 0.01, 0.015):
        tiny = tmp_path / f"val_{fraction}"
        try:
            manifest = prepare(DataConfig(dir=str(tiny), sources=[str(source)], vocab_size=400, val_fraction=fraction),
                               log=lambda *_: None)
        except ValueError:  # no document drawn for val at this fraction
            continue
        if manifest["splits"]["val"]["tokens"] < 65:
            break
    tokens = manifest["splits"]["val"]["tokens"]
    assert tokens < 65
    proc = megacore("train", *tiny_args("b", f"data.dir={tiny}"), "--nproc", "2", check=False)
    _refused_before_start(proc, tmp_path / "b", f"holds {tokens} tokens", "data.seq_len + 1 = 65")


def test_a_url_as_run_or_data_directory_is_refused_naming_the_key(tiny_args, tmp_path):
    proc = megacore("train", *tiny_args("run", "train.run_dir=s3://bucket/run"), check=False)
    assert proc.returncode == 2 and "train.run_dir=s3://bucket/run is a URL" in proc.stderr
    assert not (REPO / "s3:").exists()
    proc = megacore("data", "prepare", "configs/tiny.yaml", "data.dir=gs://bucket/data", check=False)
    assert proc.returncode == 2 and "data.dir=gs://bucket/data is a URL" in proc.stderr


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


# 11. Smaller ones


def test_bits_per_byte_of_chat_data_counts_the_text_not_its_json(tmp_path, data_dir):
    pairs = [{"prompt": f"Question {i}: where is the kitchen, «please»?", "response": f"Down the hall, door {i}."}
             for i in range(60)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    manifest = prepare(DataConfig(dir=str(tmp_path / "chat"), sources=[str(tmp_path / "pairs.jsonl")], format="chat",
                                  tokenizer_from=str(data_dir), val_fraction=0.0), log=lambda *_: None)
    text_bytes = sum(len(f"{p['prompt']}\n{p['response']}".encode()) for p in pairs)
    assert manifest["splits"]["train"]["bytes"] == text_bytes


def test_the_console_line_is_short_and_starts_with_the_eta(tiny_args):
    out = megacore("train", *tiny_args("run", "train.steps=4", "train.eval_every=4")).stdout
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 5 and all(len(line) <= 100 for line in lines), lines
    assert lines[1].split(" | ")[1].startswith("eta "), lines[1]
    assert "val loss" in lines[-1] and "bpb" in lines[-1]


def test_cjk_text_with_a_small_vocabulary_gets_a_coverage_that_fits_unless_one_is_set(tmp_path):
    # 6,000 characters in a Zipf-like mix: more than a 3,000-piece vocabulary can give each one a piece.
    rng = np.random.default_rng(0)
    chars = np.array([chr(0x4E00 + i) for i in range(6000)])
    weights = np.arange(1, 6001) ** -1.4
    lines = ["".join(rng.choice(chars, size=60, p=weights / weights.sum())) + "。" for _ in range(3000)]
    (tmp_path / "poems.txt").write_text("\n\n".join(lines))
    prep = ["data", "prepare", "configs/tiny.yaml", f"data.sources=[{tmp_path / 'poems.txt'}]", "data.vocab_size=3000"]
    chosen = megacore(*prep, f"data.dir={tmp_path / 'auto'}").stdout
    assert "data.character_coverage is not set" in chosen and "1,368 most frequent characters" in chosen, chosen
    explicit = megacore(*prep, f"data.dir={tmp_path / 'a'}", "data.character_coverage=0.9995", check=False)
    assert explicit.returncode == 2 and "data.character_coverage=0.9995" in explicit.stderr, "a set value is kept"
    megacore(*prep, f"data.dir={tmp_path / 'b'}", "data.character_coverage=0.99")
    from data_pipeline.tokenizer import RESERVED_PIECES, Tokenizer

    for name in ("auto", "b"):
        tokenizer = Tokenizer(tmp_path / name / "tokenizer.model")
        rare = lines[0] + chr(0x4E00 + 5999) * 3
        assert tokenizer.decode(tokenizer.encode(rare)) == rare, "rare characters are spelled in bytes"
    auto = Tokenizer(tmp_path / "auto" / "tokenizer.model")
    singles = sum(len(auto.sp.id_to_piece(i)) == 1 and not auto.sp.is_byte(i) for i in range(auto.vocab_size))
    assert singles <= (3000 - RESERVED_PIECES) // 2 + 1 and auto.vocab_size == 3000  # (+1: the "▁" piece)
    assert "already prepared" in megacore(*prep, f"data.dir={tmp_path / 'auto'}").stdout


# 10. CI cannot pass without the Slurm tests


def test_a_missing_slurm_fails_the_launcher_tests_unless_skipping_is_asked_for(tmp_path):
    (tmp_path / "test_needs_slurm.py").write_text(
        "from tests.helpers import require_slurm\n\n\ndef test_job():\n    require_slurm('no-such-slurm-tool')\n")
    env = {k: v for k, v in os.environ.items() if k != "MEGACORE_SKIP_SLURM"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", str(tmp_path / "test_needs_slurm.py")]
    failed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "no-such-slurm-tool" in failed.stdout and "MEGACORE_SKIP_SLURM=1" in failed.stdout
    skipped = subprocess.run(cmd, cwd=tmp_path, env={**env, "MEGACORE_SKIP_SLURM": "1"}, capture_output=True,
                             text=True, timeout=120)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout
    assert "skipped because MEGACORE_SKIP_SLURM=1" in skipped.stdout, "pytest's summary says why"


# 6. Large sources are streamed

# The bound, per process (parent and tokenizer workers alike), is 200 MB for a 320 MB source (measured
# peak 156 MB; the source was 512 MB with a 256 MB bound before, trimmed for the suite's time). What a process
# holds: the interpreter and libraries (~70 MB), 2 x workers shards of data.shard_mb in flight, the
# tokenizer's training sample; none of that grows with the file. What does grow is exact de-duplication's
# set of digests, about 180 bytes per distinct document (~7 MB for the 40k documents of 8 KB here).
STREAMED_SOURCE_MB = 320
PREPARE_RSS_BOUND_MB = 200  # well below the source: preparation streams it


@pytest.mark.slow
def test_a_large_compressed_source_is_prepared_in_bounded_memory(tmp_path):
    import psutil
    import zstandard

    rng = np.random.default_rng(0)
    words = np.array("to be or not that is the question whether tis nobler in mind suffer slings arrows".split())
    sentences = [" ".join(rng.choice(words, size=160)) for _ in range(512)]
    source, written, n = tmp_path / "big.jsonl.zst", 0, 0
    with open(source, "wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as out:
        while written < STREAMED_SOURCE_MB * 2**20:
            text = " ".join(sentences[(n * 8 + k) % 512] for k in range(8))
            line = (json.dumps({"text": f"{text} {n}"}) + "\n").encode()
            out.write(line)
            written, n = written + len(line), n + 1
    proc = subprocess.Popen([sys.executable, "-m", "megacore", "data", "prepare", "configs/tiny.yaml",
                             f"data.dir={tmp_path / 'data'}", f"data.sources=[{source}]", "data.shard_mb=2",
                             "data.tokenizer_sample_mb=1", "data.vocab_size=400", "data.dedup=false"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak: dict[int, int] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                peak[p.pid] = max(peak.get(p.pid, 0), p.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    manifest = read_manifest(tmp_path / "data")
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == n
    worst = max(peak.values()) / 2**20
    assert len(peak) >= 2 and worst < PREPARE_RSS_BOUND_MB, (worst, {k: v / 2**20 for k, v in peak.items()})


# 8. Identity is checked


@pytest.fixture(scope="module")
def small_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("identity") / "run"
    megacore("train", *tiny_run_args(data_dir, run, "train.steps=2", *NO_EVAL))
    return run


@pytest.fixture(scope="module")
def other_tokenizer_data(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("other") / "data"
    source = out.parent / "in.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(400, 5)))
    megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={out}", f"data.sources=[{source}]", "data.vocab_size=512")
    return out


def test_init_from_and_eval_refuse_data_of_another_tokenizer_naming_both(small_run, other_tokenizer_data, tmp_path):
    ours = read_manifest(other_tokenizer_data)["tokenizer"]["sha256"]
    theirs = json.loads((list_checkpoints(small_run)[-1] / "meta.json").read_text())["tokenizer_sha256"]
    proc = megacore("train", *tiny_run_args(other_tokenizer_data, tmp_path / "run", f"train.init_from={small_run}"),
                    check=False)
    assert proc.returncode == 2 and ours in proc.stderr and theirs in proc.stderr
    proc = megacore("eval", small_run, "--data-dir", other_tokenizer_data, check=False)
    assert proc.returncode == 2 and ours in proc.stderr and theirs in proc.stderr


@pytest.mark.parametrize("change, extra, named", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, [], "rope_scaling"),
    ({"attention_bias": True}, [], "attention_bias=True"),
    ({"sliding_window": 4096}, [], "sliding_window=4096"),
    ({"head_dim": 32}, [], "q_proj.weight of shape (64, 64), the model its config.json describes needs (128, 64)"),
    ({}, ["model.rope_theta=20000"], "model.rope_theta=20000 contradicts train.init_from"),
])
def test_hf_import_refuses_what_it_would_not_reproduce(small_run, data_dir, tmp_path, change, extra, named):
    """The directory defines the model; what it asks for that we do not implement, weights that do not fit
    its own config, and a model.* override that contradicts it are refused by name before any process."""
    hf = tmp_path / "hf"
    megacore("export-hf", small_run, hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **change}))
    proc = megacore("train", *tiny_run_args(data_dir, tmp_path / "run", f"train.init_from={hf}", *extra), check=False)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


# 3. Loading a checkpoint executes nothing


def test_a_pickle_planted_in_dcp_metadata_runs_on_no_load_path(small_run, data_dir, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(small_run, run)
    ckpt = list_checkpoints(run)[-1]
    (ckpt / ".metadata").write_bytes(pickle.dumps(PlantedPayload(marker)))
    rewrite_manifest(ckpt)
    assert megacore("checkpoints", "verify", run).returncode == 0
    for args in (["eval", run, "--batches", "1"], ["generate", run, "--max-new-tokens", "2"],
                 ["export-hf", run, tmp_path / "hf"], ["checkpoints", "consolidate", run, tmp_path / "weights"],
                 ["train", *tiny_run_args(data_dir, run, "train.steps=4", *NO_EVAL), "--resume", "auto"],
                 ["train", *tiny_run_args(data_dir, tmp_path / "new", f"train.init_from={run}", *NO_EVAL)]):
        proc = megacore(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "refused to load posix.system" in proc.stderr and str(ckpt / ".metadata") in proc.stderr, args
    assert not marker.exists(), "nothing in the checkpoint ran"


def test_a_pickle_planted_among_dcp_entries_runs_nothing_on_resume(small_run, data_dir, tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    run, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(small_run, run)
    ckpt = list_checkpoints(run)[-1]
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # our own test file: trusted here
    index = next(i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    info = metadata.storage_data[index]
    payload = io.BytesIO()
    torch.save(PlantedPayload(marker), payload)
    target = ckpt / info.relative_path
    offset = target.stat().st_size
    with open(target, "ab") as f:
        f.write(payload.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    rewrite_manifest(ckpt)
    proc = megacore("train", *tiny_run_args(data_dir, run, "train.steps=4", *NO_EVAL), "--resume", "auto", check=False)
    assert proc.returncode == 2 and f"refused to load the entry {index.fqn}" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()
