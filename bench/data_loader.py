"""Loader throughput: megacore's PackedLoader against Hugging Face `datasets` over the same windows.

Both read the same seq_len+1 token windows of the Shakespeare train split in a shuffled order and
produce (input_ids, labels) int64 tensors of the same global batch shape, on one process. The HF side
is the common recipe: `Dataset.from_dict` of the windows (Arrow-backed), `.shuffle(seed)`,
`.with_format("torch")`, iterated in batches.

    python bench/data_loader.py [--seq-len 256] [--batch 32] [--tokens 20000000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from corpora import shakespeare
from report import record

from data_pipeline.loader import PackedLoader, TokenStore
from data_pipeline.prepare import prepare
from megacore.config import DataConfig


def tokens_per_second(next_batch, tokens_per_batch: int, total_tokens: int) -> float:
    next_batch()  # warm-up
    steps = max(1, total_tokens // tokens_per_batch)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next_batch()
        assert batch["input_ids"].shape[0] * batch["input_ids"].shape[1] == tokens_per_batch
    return steps * tokens_per_batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20_000_000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        cfg = DataConfig(dir=str(workdir / "shakespeare"), sources=shakespeare(), vocab_size=2048)
        prepare(cfg, log=lambda *_: None)
        store = TokenStore(cfg.dir, "train")
        per_batch = args.batch * args.seq_len
        results = {}
        for workers in (0, 2):
            loader = PackedLoader(store, args.seq_len, args.batch, seed=0, num_workers=workers,
                                  document_positions=False)
            results[f"megacore (workers={workers})"] = tokens_per_second(loader.next_batch, per_batch, args.tokens)
            loader.close()

        import datasets

        datasets.disable_progress_bars()
        n = (store.num_tokens - 1) // args.seq_len
        windows = np.stack([store.read(i * args.seq_len, args.seq_len + 1) for i in range(n)])
        ds = datasets.Dataset.from_dict({"tokens": windows}).shuffle(seed=0).with_format("torch")
        batches = iter(())

        def hf_next():
            nonlocal batches
            try:
                tokens = next(batches)["tokens"]
            except StopIteration:
                batches = ds.iter(batch_size=args.batch, drop_last_batch=True)
                tokens = next(batches)["tokens"]
            return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

        results["hf datasets"] = tokens_per_second(hf_next, per_batch, args.tokens // 4)
        reference = results["hf datasets"]
        print(f"{'loader':<24} {'tokens/s':>14} {'vs datasets':>12}")
        for name, tps in results.items():
            print(f"{name:<24} {tps:>14,.0f} {tps / reference:>11.1f}x")
        ours = results["megacore (workers=0)"]
        record(f"loader, seq {args.seq_len}, batch {args.batch}", f"{ours / 1e6:.1f} M tokens/s",
               f"HF datasets: {reference / 1e6:.1f} M tokens/s", f"{ours / reference:.1f}x", ">= 3x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
