"""Document cleaning with counters: Unicode normalisation, control characters, length filters and
exact de-duplication by content hash."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import asdict, dataclass

# C0 and C1 control characters except tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class CleanStats:
    kept: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicates: int = 0
    control_chars_removed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class Cleaner:
    """`clean(text)` returns (cleaned text, its sha256 digest), or None for a dropped document."""

    def __init__(self, normalize: str = "NFC", min_chars: int = 1, max_chars: int = 1_000_000, dedup: bool = True):
        self.normalize, self.min_chars, self.max_chars, self.dedup = normalize, min_chars, max_chars, dedup
        self.stats = CleanStats()
        self._seen: set[bytes] = set()

    def clean(self, text: str) -> tuple[str, bytes] | None:
        # Length is checked first so a pathological document costs nothing more.
        if len(text) > self.max_chars:
            self.stats.too_long += 1
            return None
        if self.normalize != "none" and not text.isascii():  # ASCII is already in every normal form
            text = unicodedata.normalize(self.normalize, text)
        text, removed = _CONTROL.subn("", text)
        self.stats.control_chars_removed += removed
        if len(text.strip()) < self.min_chars:
            self.stats.too_short += 1
            return None
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if self.dedup:
            if digest in self._seen:
                self.stats.duplicates += 1
                return None
            self._seen.add(digest)
        self.stats.kept += 1
        return text, digest
