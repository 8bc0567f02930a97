"""`megacore data prepare`: raw sources -> cleaned documents -> tokenizer -> Arrow shards + manifest.

Two streaming passes over the sources, so memory stays bounded by the shards in flight:
1. the first `data.tokenizer_sample_mb` of training text trains the tokenizer (skipped on a rerun
   when `tokenizer.json` records the same settings and source files, names and sizes);
   a rerun does nothing when the manifest records the same settings and the same sources: the same
   files with the same sizes, versions (etag or modification time) and, for small ones, content hashes;
2. documents are cleaned, split into train/val by content hash, and cut into shards of about
   `data.shard_mb` of text. Each shard is tokenized in a worker process and written atomically with
   a sidecar `*.arrow.json` naming the tokenizer and a digest of its documents. A rerun skips every
   shard whose sidecar matches, so an interrupted preparation resumes where it stopped.
The manifest is written last; until then the directory is not a dataset the loader will open.

`data.dir` may be an object-store URL: the directory is prepared in a local staging directory
($MEGACORE_CACHE/prepare/...) and uploaded, each shard (then deleted here) as soon as it is written, so
that local disk holds about 2 x prepare_workers shards; the manifest goes up last. The old manifest is
removed first, and shards the new one does not name are deleted before it appears. (An interrupted
preparation into a store tokenizes again the shards it had uploaded.)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.chat import check_chat_tokenizer, contents, render
from data_pipeline.cleaning import Cleaner
from data_pipeline.durable import read_json_object, write_json_atomic
from data_pipeline.errors import DataError
from data_pipeline.shards import MANIFEST, TOKENIZER, file_sha256, fingerprint, read_manifest, token_dtype, write_shard
from data_pipeline.sources import SourceStats, iter_documents, source_identity, source_listing
from data_pipeline.storage import cache_dir_for, is_url, listing, location, remove_file, upload, upload_tree
from data_pipeline.tokenizer import Tokenizer, copy_tokenizer, load_tokenizer, train_tokenizer
from data_pipeline.upgrade import MANIFEST_VERSION, SIDECAR_VERSION, upgrade_sidecar

TOKENIZER_SIDECAR = "tokenizer.json"
SETTINGS = ("sources", "text_unit", "text_field", "format", "tokenizer_from", "normalize", "min_doc_chars",
            "max_doc_chars", "dedup", "strict_utf8", "tokenizer_type", "vocab_size", "character_coverage",
            "tokenizer_sample_mb", "val_fraction", "shard_mb")
# The tokenizer sidecar's format, SIDECAR_VERSION (2: data.character_coverage as set, null: megacore
# chooses), and the upgrade of older sidecars are in data_pipeline/upgrade.py.


def split_of(digest: bytes, val_fraction: float) -> str:
    """Split by content hash: a document keeps its split whatever order the inputs come in."""
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def prepare(data_cfg, log=print, publish=None) -> dict:
    """Prepare `data_cfg.dir` from `data_cfg.sources`; returns the manifest. Skips if already up to date.
    `publish(shard_path)` is called in order as each shard and its sidecar are complete (an upload)."""
    if is_url(data_cfg.dir):
        return _prepare_to_store(data_cfg, log)
    out = Path(data_cfg.dir)
    settings, sources, old = _existing(data_cfg)
    if _up_to_date(old, settings, sources, out, log):
        return old
    if old.get("settings") and old.get("sources") != sources:
        log(f"{out}: the sources changed since it was prepared: preparing again")
    out.mkdir(parents=True, exist_ok=True)
    # The old manifest no longer describes what is being written.
    (out / MANIFEST).unlink(missing_ok=True)
    for leftover in out.glob("*.tmp"):
        leftover.unlink()
    t0 = time.time()

    tokenizer = _tokenizer(data_cfg, out, settings, log)
    dtype = token_dtype(tokenizer.vocab_size)

    stats, cleaner = SourceStats(), _cleaner(data_cfg)
    buffers = {"train": [], "val": []}
    buffer_bytes = {"train": 0, "val": 0}
    split_bytes = {"train": 0, "val": 0}
    shard_index = {"train": 0, "val": 0}
    source_digest = hashlib.sha256()
    jobs: list = []
    workers = data_cfg.prepare_workers or os.cpu_count() or 1
    shard_limit = int(data_cfg.shard_mb * 2**20)
    # fork on Linux: no threads are alive here (sentencepiece's have finished), workers start at once
    # and work from notebooks too; spawn elsewhere.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    unpublished = collections.deque()  # jobs whose shard `publish` has not seen yet, oldest first

    def publish_done(in_flight: int) -> None:
        """Publish finished shards in order, waiting until at most `in_flight` jobs are left (this bounds the
        documents held in flight and, when publishing uploads and removes, the shards on local disk)."""
        while unpublished and (len(unpublished) > in_flight or unpublished[0].done()):
            record = unpublished.popleft().result()
            if publish is not None:
                publish(out / record["file"])

    with ProcessPoolExecutor(workers, context, _init_worker, (str(tokenizer.path),)) as pool:
        def submit(split: str) -> None:
            publish_done(2 * workers - 1)
            name = f"{split}-{shard_index[split]:05d}.arrow"
            jobs.append(pool.submit(_write_shard_job, str(out / name), buffers[split], dtype.name, tokenizer.sha256,
                                    data_cfg.format == "chat"))
            unpublished.append(jobs[-1])
            shard_index[split] += 1
            buffers[split], buffer_bytes[split] = [], 0

        chat = data_cfg.format == "chat"
        for text in iter_documents(data_cfg.sources, data_cfg.text_unit, data_cfg.text_field, stats,
                                   data_cfg.strict_utf8, chat=chat):
            cleaned = cleaner.clean(text)
            if cleaned is None:
                continue
            text, digest = cleaned
            source_digest.update(digest)
            split = split_of(digest, data_cfg.val_fraction)
            # UTF-8 bytes of the text itself (for chat: the messages, not their JSON), for bits per byte.
            size = len((contents(text) if chat else text).encode("utf-8"))
            buffers[split].append(text)
            buffer_bytes[split] += size
            split_bytes[split] += size
            if buffer_bytes[split] >= shard_limit:
                submit(split)
        for split in ("train", "val"):
            if buffers[split]:
                submit(split)
        for _ in tqdm(range(len(unpublished)), desc="tokenize + write shards", unit="shard", leave=False):
            publish_done(len(unpublished) - 1)
        records = [job.result() for job in jobs]

    for name in stats.empty_files:
        log(f"skipped empty file {name}")
    for name in stats.binary_files:
        log(f"skipped binary file {name}")
    for name in stats.replaced_bytes_files:
        log(f"warning: {name}: invalid UTF-8 bytes replaced with U+FFFD")
    splits = {}
    for split in ("train", "val"):
        shards = [r for r in records if r["file"].startswith(split + "-")]
        if shards:
            splits[split] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards),
                             "documents": sum(s["documents"] for s in shards), "bytes": split_bytes[split]}
    if "train" not in splits:
        raise DataError(f"data.sources={data_cfg.sources}: no training documents left after cleaning "
                        f"({cleaner.stats.as_dict()})")
    if data_cfg.val_fraction > 0 and "val" not in splits:
        raise DataError(f"data.val_fraction={data_cfg.val_fraction} selected no documents; raise it or add data")
    _remove_stale_shards(out, splits)
    manifest = {
        "version": MANIFEST_VERSION,
        "settings": settings,
        # Manifests written before this key existed are prepared again on the next run (same shards
        # where the sources did not change: every finished shard is reused).
        "sources": sources,
        "tokenizer": {"file": tokenizer.path.name, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                      **({"files": tokenizer.file_names} if len(tokenizer.files) > 1 else {})},
        "dtype": dtype.name,
        "splits": splits,
        "source_fingerprint": source_digest.hexdigest()[:16],
        "fingerprint": fingerprint(tokenizer.sha256, splits),
        "stats": {"files": stats.files, "documents_read": stats.documents, "empty_files": len(stats.empty_files),
                  "binary_files": len(stats.binary_files),
                  "files_with_replaced_bytes": len(stats.replaced_bytes_files), **cleaner.stats.as_dict()},
    }
    write_json_atomic(out / MANIFEST, manifest)
    skipped = sum(r.pop("reused") for r in records)
    for split, info in splits.items():
        log(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens in {len(info['shards'])} shard(s), "
            f"{info['bytes'] / info['tokens']:.2f} bytes/token")
    log(f"cleaning: {cleaner.stats.as_dict()}")
    log(f"prepared {out} in {time.time() - t0:.1f}s ({skipped} finished shard(s) reused)")
    return manifest


def _cleaner(data_cfg) -> Cleaner:
    return Cleaner(data_cfg.normalize, data_cfg.min_doc_chars, data_cfg.max_doc_chars, data_cfg.dedup)


def _tokenizer(data_cfg, out: Path, settings: dict, log) -> Tokenizer:
    """Reuse the tokenizer of an earlier run over the same inputs and settings, or train one on the
    first tokenizer_sample_mb of cleaned training text."""
    if data_cfg.tokenizer_from:
        # A megacore data or run directory (tokenizer.model), a published model's directory
        # (tokenizer.json with tokenizer_config.json), or a tokenizer file: copied next to the shards.
        try:
            source = load_tokenizer(data_cfg.tokenizer_from)
        except FileNotFoundError:
            raise FileNotFoundError(f"data.tokenizer_from={data_cfg.tokenizer_from}: no tokenizer.json or "
                                    f"tokenizer.model there") from None
        if data_cfg.format == "chat":
            check_chat_tokenizer(source, f"data.format=chat with data.tokenizer_from={data_cfg.tokenizer_from}")
        copy_tokenizer(source, out)
        log(f"using the tokenizer of {data_cfg.tokenizer_from}")
        return load_tokenizer(out / source.path.name)
    key = {"version": SIDECAR_VERSION, "settings": {k: settings[k] for k in SETTINGS if k != "shard_mb"},
           "sources": source_listing(data_cfg.sources)}
    sidecar = out / TOKENIZER_SIDECAR
    if (out / TOKENIZER).is_file() and sidecar.is_file() and _same_tokenizer_key(sidecar, key):
        log(f"reusing {out / TOKENIZER}")
        return Tokenizer(out / TOKENIZER)
    limit = int(data_cfg.tokenizer_sample_mb * 2**20)
    sample, size, cleaner = [], 0, _cleaner(data_cfg)
    chat = data_cfg.format == "chat"
    for text in iter_documents(data_cfg.sources, data_cfg.text_unit, data_cfg.text_field, SourceStats(),
                               data_cfg.strict_utf8, chat=chat):
        cleaned = cleaner.clean(text)
        if cleaned is None or split_of(cleaned[1], data_cfg.val_fraction) != "train":
            continue
        sample.append(contents(cleaned[0]) if chat else cleaned[0])
        size += len(sample[-1].encode("utf-8"))
        if size >= limit:
            break
    if not sample:
        raise DataError(f"data.sources={data_cfg.sources}: no training documents to train the tokenizer on "
                        f"(after cleaning and the val split)")
    t0 = time.time()
    tokenizer = train_tokenizer(sample, out / TOKENIZER, data_cfg.vocab_size, data_cfg.tokenizer_type,
                                data_cfg.character_coverage, log)
    write_json_atomic(sidecar, key)
    log(f"trained {data_cfg.tokenizer_type} tokenizer on {size / 2**20:.1f} MB, vocab {tokenizer.vocab_size} "
        f"({time.time() - t0:.1f}s)")
    if tokenizer.vocab_size < data_cfg.vocab_size:
        log(f"warning: the corpus supports only {tokenizer.vocab_size} pieces, fewer than "
            f"data.vocab_size={data_cfg.vocab_size}")
    return tokenizer


def _existing(data_cfg) -> tuple[dict, list, dict]:
    """(the settings and sources data_cfg asks for, the manifest data.dir has: {} if none or unreadable)."""
    if not data_cfg.sources:
        raise DataError("data.sources is empty: name at least one file, glob or URL of raw text")
    try:
        old = read_manifest(data_cfg.dir)
    except (FileNotFoundError, DataError):  # none yet, or unreadable: prepared again
        old = {}
    return {k: getattr(data_cfg, k) for k in SETTINGS}, source_identity(data_cfg.sources), old


def _up_to_date(old: dict, settings: dict, sources: list, where, log) -> bool:
    if old.get("settings") == settings and old.get("sources") == sources:
        log(f"{where}: already prepared from these sources with these settings "
            f"({old['splits']['train']['tokens']:,} train tokens)")
        return True
    return False


def _prepare_to_store(data_cfg, log) -> dict:
    """data.dir in object storage: prepared in local staging, then uploaded with the manifest last."""
    dest = location(data_cfg.dir)
    settings, sources, old = _existing(data_cfg)
    if _up_to_date(old, settings, sources, dest, log):
        return old
    staging = cache_dir_for("prepare", dest)
    remove_file(dest / MANIFEST)  # (the old one no longer describes what is being written)

    def upload_shard(path: Path) -> None:  # each shard as it is finished; then it leaves local disk
        if path.is_file():
            upload(path, dest / path.name)
            upload(path.with_name(path.name + ".json"), dest / (path.name + ".json"))
            path.unlink()

    manifest = prepare(dataclasses.replace(data_cfg, dir=str(staging)), log, publish=upload_shard)
    named = {s["file"] for info in manifest["splits"].values() for s in info["shards"]}
    for stale in listing(dest):
        if stale.name.endswith((".arrow", ".arrow.json")) and stale.name.removesuffix(".json") not in named:
            remove_file(stale)
    upload_tree(staging, dest, last=(MANIFEST,))
    shutil.rmtree(staging)
    log(f"uploaded {dest} (manifest last)")
    return manifest


def _same_tokenizer_key(sidecar: Path, new: dict) -> bool:
    """The tokenizer beside the sidecar was trained from what `new` describes (a sidecar that cannot be
    read, or from a newer megacore, is not: the tokenizer is trained again)."""
    try:
        return upgrade_sidecar(read_json_object(sidecar, DataError, "a tokenizer sidecar"), sidecar) == new
    except DataError:
        return False


def _remove_stale_shards(out: Path, splits: dict) -> None:
    """Shards (and sidecars) of an earlier preparation that the new manifest does not name."""
    named = {s["file"] for info in splits.values() for s in info["shards"]}
    for path in list(out.glob("*.arrow")) + list(out.glob("*.arrow.json")):
        if path.name.removesuffix(".json") not in named:
            path.unlink()


# ----------------------------------------------------------------------------------------------
# Worker processes: each holds the tokenizer and writes whole shards.

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    # A forked worker: the `tokenizers` library's own thread pool must not start here (the workers are the
    # parallelism).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _write_shard_job(path: str, texts: list[str], dtype: str, tokenizer_sha256: str, chat: bool = False) -> dict:
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    key = {"tokenizer_sha256": tokenizer_sha256, "chat": chat,
           "text_sha256": hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()}
    if path.is_file() and sidecar.is_file():
        record = json.loads(sidecar.read_text())
        if record.get("key") == key and file_sha256(path) == record["shard"]["sha256"]:
            return {**record["shard"], "reused": True}
    sidecar.unlink(missing_ok=True)
    mask = None
    if chat:
        rendered = [render(_worker_tokenizer, json.loads(text)) for text in texts]
        encoded = [ids for ids, _ in rendered]
        mask = np.fromiter(itertools.chain.from_iterable(m for _, m in rendered), dtype=np.uint8)
    else:
        encoded = _worker_tokenizer.encode_batch(texts, add_eos=True)
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    values = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.dtype(dtype), count=int(lengths.sum()))
    shard = write_shard(path, values, lengths, mask)
    write_json_atomic(sidecar, {"key": key, "shard": shard})
    return {**shard, "reused": False}
