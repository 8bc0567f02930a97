"""`megacore data prepare|inspect|verify|order`: the data pipeline from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.shards import file_sha256, read_manifest, read_shard


class DataError(ValueError):
    """Bad data or data settings; the message names the file or key."""


def prepare(args) -> int:
    from data_pipeline.prepare import prepare as run_prepare
    from megacore.config import load_config

    cfg = load_config(args.config, args.overrides)
    try:
        run_prepare(cfg.data)
    except ValueError as e:  # SourceError included
        raise DataError(str(e)) from None
    return 0


def inspect(args) -> int:
    import numpy as np

    from data_pipeline.tokenizer import Tokenizer

    manifest = read_manifest(args.dir)
    print(f"{args.dir}: fingerprint {manifest['fingerprint']}, tokenizer vocab {manifest['tokenizer']['vocab_size']} "
          f"({manifest['tokenizer']['sha256'][:12]}), dtype {manifest['dtype']}")
    for split, info in manifest["splits"].items():
        print(f"  {split}: {info['documents']:,} documents, {info['tokens']:,} tokens, {len(info['shards'])} shard(s), "
              f"{info['bytes'] / info['tokens']:.2f} bytes/token, "
              f"{info['tokens'] / info['documents']:.1f} tokens/document")
    print("  stats: " + ", ".join(f"{k} {v:,}" for k, v in manifest["stats"].items()))
    if args.split not in manifest["splits"]:
        raise DataError(f"{args.dir}: no split {args.split!r}")
    values, offsets = read_shard(Path(args.dir) / manifest["splits"][args.split]["shards"][0]["file"])
    tokenizer = Tokenizer(Path(args.dir) / manifest["tokenizer"]["file"])
    lengths = np.diff(offsets)
    print(f"  {args.split} document length (tokens): min {lengths.min()}, median {int(np.median(lengths))}, "
          f"max {lengths.max()}")
    sample = tokenizer.decode(values[offsets[0]:offsets[min(len(offsets) - 1, 20)]].tolist())
    print(f"--- first documents of {args.split}, decoded ---\n{sample[:args.chars]}")
    return 0


def verify(args) -> int:
    manifest = read_manifest(args.dir)
    problems = []
    files = [(Path(args.dir) / manifest["tokenizer"]["file"], manifest["tokenizer"]["sha256"], None)]
    files += [(Path(args.dir) / s["file"], s["sha256"], s["tokens"])
              for info in manifest["splits"].values() for s in info["shards"]]
    for path, sha, tokens in files:
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif file_sha256(path) != sha:
            problems.append(f"{path}: sha256 mismatch (file altered or truncated)")
        elif tokens is not None:
            try:
                if len(read_shard(path)[0]) != tokens:
                    problems.append(f"{path}: token count differs from the manifest")
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise DataError("verification failed:\n  " + "\n  ".join(problems))
    print(f"{args.dir}: {len(files)} files verified")
    return 0


def order(args) -> int:
    from data_pipeline.loader import PackedLoader, TokenStore

    if not 0 <= args.dp_rank < args.dp_size:
        raise DataError(f"--dp-rank {args.dp_rank} is not in [0, --dp-size {args.dp_size})")
    try:
        loader = PackedLoader(TokenStore(args.dir, args.split), args.seq_len, args.global_batch, args.dp_rank,
                              args.dp_size, seed=args.seed)
    except ValueError as e:
        raise DataError(str(e)) from None
    loader.skip(args.start_step)
    for step in range(args.start_step, args.start_step + args.steps):
        ids = loader.next_batch()["sample_ids"][:, 1].tolist()
        if args.json:
            print(json.dumps({"step": step, "dp_rank": args.dp_rank, "sample_ids": ids}))
        else:
            print(f"step {step}: {' '.join(map(str, ids))}")
    return 0
