"""`megacore data prepare`: raw sources -> tokenizer + train/val Arrow shards + manifest."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.shards import (MANIFEST, MANIFEST_VERSION, TOKENIZER, fingerprint, read_manifest, token_dtype,
                                  write_json_atomic, write_shard)
from data_pipeline.sources import SourceStats, iter_documents
from data_pipeline.tokenizer import Tokenizer, train_tokenizer

ENCODE_BATCH = 1024


def split_of(text: str, val_fraction: float) -> str:
    """Split by content hash: a document keeps its split whatever order the inputs come in."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return "val" if h < val_fraction * 2**64 else "train"


def prepare(data_cfg, log=print) -> dict:
    """Prepare `data_cfg.dir` from `data_cfg.sources`; returns the manifest. Skips if already up to date."""
    out = Path(data_cfg.dir)
    settings = {k: getattr(data_cfg, k) for k in
                ("sources", "text_unit", "text_field", "tokenizer_type", "vocab_size", "val_fraction", "shard_tokens")}
    try:
        old = read_manifest(out)
    except (FileNotFoundError, ValueError):
        old = {}
    if old.get("settings") == settings:
        log(f"{out}: already prepared with these settings ({old['splits']['train']['tokens']:,} train tokens)")
        return old
    if not data_cfg.sources:
        raise ValueError("data.sources is empty: name at least one file, glob or URL of raw text")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    stats = SourceStats()
    docs = {"train": [], "val": []}
    for text in iter_documents(data_cfg.sources, data_cfg.text_unit, data_cfg.text_field, stats):
        docs[split_of(text, data_cfg.val_fraction)].append(text)
    for name in stats.replaced_bytes_files:
        log(f"warning: {name}: invalid UTF-8 bytes replaced with U+FFFD")
    if not docs["train"]:
        raise ValueError(f"no training documents in {data_cfg.sources}")
    if data_cfg.val_fraction > 0 and not docs["val"]:
        raise ValueError(f"data.val_fraction={data_cfg.val_fraction} selected no documents; raise it or add data")
    log(f"read {stats.documents:,} documents from {stats.files} files "
        f"({len(docs['train']):,} train, {len(docs['val']):,} val)")

    tokenizer = train_tokenizer(docs["train"], out / TOKENIZER, data_cfg.vocab_size, data_cfg.tokenizer_type)
    log(f"trained {data_cfg.tokenizer_type} tokenizer, vocab {tokenizer.vocab_size} ({time.time() - t0:.1f}s)")
    if tokenizer.vocab_size < data_cfg.vocab_size:
        log(f"warning: the corpus supports only {tokenizer.vocab_size} pieces, fewer than "
            f"data.vocab_size={data_cfg.vocab_size}")

    dtype = token_dtype(tokenizer.vocab_size)
    splits = {split: _write_split(out, split, texts, tokenizer, dtype, data_cfg.shard_tokens)
              for split, texts in docs.items() if texts}
    manifest = {
        "version": MANIFEST_VERSION,
        "settings": settings,
        "tokenizer": {"file": TOKENIZER, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
        "dtype": dtype.name,
        "splits": splits,
        "fingerprint": fingerprint(tokenizer.sha256, splits),
        "stats": {"files": stats.files, "documents": stats.documents, "empty_skipped": stats.empty_skipped,
                  "files_with_replaced_bytes": len(stats.replaced_bytes_files)},
    }
    write_json_atomic(out / MANIFEST, manifest)
    # Shards of an earlier preparation that the new manifest no longer names.
    named = {s["file"] for sp in splits.values() for s in sp["shards"]}
    for stale in out.glob("*.arrow"):
        if stale.name not in named:
            stale.unlink()
    for split, info in splits.items():
        log(f"{split}: {info['tokens']:,} tokens in {len(info['shards'])} shard(s), "
            f"{info['bytes'] / info['tokens']:.2f} bytes/token")
    log(f"prepared {out} in {time.time() - t0:.1f}s")
    return manifest


def _write_split(out: Path, split: str, texts: list[str], tokenizer: Tokenizer, dtype, shard_tokens: int) -> dict:
    shards, pending, pending_tokens = [], [], 0
    eos = np.array([tokenizer.eos_id], dtype=np.int64)

    def flush():
        nonlocal pending, pending_tokens
        shards.append(write_shard(out / f"{split}-{len(shards):05d}.arrow", pending, dtype))
        pending, pending_tokens = [], 0

    for start in tqdm(range(0, len(texts), ENCODE_BATCH), desc=f"tokenize {split}", unit="batch", leave=False):
        for ids in tokenizer.encode_batch(texts[start:start + ENCODE_BATCH]):
            doc = np.concatenate([np.asarray(ids, dtype=np.int64), eos])
            pending.append(doc)
            pending_tokens += len(doc)
            if pending_tokens >= shard_tokens:
                flush()
    if pending:
        flush()
    return {
        "shards": shards,
        "tokens": sum(s["tokens"] for s in shards),
        "documents": sum(s["documents"] for s in shards),
        # UTF-8 bytes of the text (separators excluded), for bits-per-byte.
        "bytes": sum(len(t.encode("utf-8")) for t in texts),
    }
