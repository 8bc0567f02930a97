"""Preparing data: chat data's bytes are its text's (for bits per byte), CJK text with a small vocabulary
gets a character coverage that fits, and a large compressed source is streamed in bounded memory."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipeline.prepare import prepare
from data_pipeline.shards import read_manifest
from megacore.config import DataConfig
from tests.helpers import REPO, failure_message, megacore


def test_bits_per_byte_of_chat_data_counts_the_text_not_its_json(tmp_path, data_dir):
    pairs = [{"prompt": f"Question {i}: where is the kitchen, «please»?", "response": f"Down the hall, door {i}."}
             for i in range(60)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    manifest = prepare(DataConfig(dir=str(tmp_path / "chat"), sources=[str(tmp_path / "pairs.jsonl")], format="chat",
                                  tokenizer_from=str(data_dir), val_fraction=0.0), log=lambda *_: None)
    text_bytes = sum(len(f"{p['prompt']}\n{p['response']}".encode()) for p in pairs)
    assert manifest["splits"]["train"]["bytes"] == text_bytes


@pytest.mark.processes
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


# Large sources are streamed

# The bound, per process (parent and tokenizer workers alike), is 200 MB for a 320 MB source (measured
# peak 156 MB; the source was 512 MB with a 256 MB bound before, trimmed for the suite's time). What a process
# holds: the interpreter and libraries (~70 MB), 2 x workers shards of data.shard_mb in flight, the
# tokenizer's training sample; none of that grows with the file. What does grow is exact de-duplication's
# set of digests, about 180 bytes per distinct document (~7 MB for the 40k documents of 8 KB here).
STREAMED_SOURCE_MB = 320
PREPARE_RSS_BOUND_MB = 200  # well below the source: preparation streams it


@pytest.mark.slow
@pytest.mark.processes
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
    assert proc.returncode == 0, failure_message(subprocess.CompletedProcess(proc.args, proc.returncode, out))
    manifest = read_manifest(tmp_path / "data")
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == n
    worst = max(peak.values()) / 2**20
    assert len(peak) >= 2 and worst < PREPARE_RSS_BOUND_MB, (worst, {k: v / 2**20 for k, v in peak.items()})
