"""A bounded local cache of token shards that live in object storage (data.dir=s3://...).

The loader memory-maps shards; a store has no memory maps, and a shard must be verified whole (its
sha256) before any of it is trained on. So a shard in object storage is downloaded whole, hashed as it
streams in, and kept under its sha256 (content-addressed: shards of different datasets or versions
never collide, and a file under its final name is a verified copy). The cache holds at most
`max_bytes`; beyond that the least recently used shards are deleted (a shard still memory-mapped by a
loader stays readable until it is closed: unlinking does not unmap it). This is how LLM-Foundry's
streaming datasets work too; ranged reads of single windows would skip the verification.

Cost per step: nothing while the shards a step reads are cached (a stat and a timestamp per shard a
batch first touches); a miss downloads one whole shard (about data.shard_mb of text, as tokens). With a
cache that holds the whole corpus (the default 64 GB is about 30B tokens), each node downloads each
shard once per run; a smaller cache under a shuffled order downloads shards again as they come back
(size the cache to the node's local disk). Processes of a node share the cache: each download lands
under a temporary name and is renamed, so two ranks fetching one shard both succeed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from data_pipeline.errors import ShardError
from data_pipeline.storage import Location, cache_root

DEFAULT_CACHE_GB = 64.0


class ShardCache:
    def __init__(self, root: str | Path | None = None, max_gb: float = DEFAULT_CACHE_GB):
        self.root = Path(root) if root else cache_root() / "shards"
        self.max_bytes = int(max_gb * 2**30)
        self.downloads = 0  # shards fetched by this process (for tests and benchmarks)

    def fetch(self, source: Location, sha256: str) -> Path:
        """A verified local copy of `source`, whose manifest says `sha256`; ShardError naming the URL when
        the object differs."""
        local = self.root / f"{sha256}{Path(source.name).suffix}"
        if local.is_file():
            try:
                os.utime(local)  # recency, for eviction
                return local
            except FileNotFoundError:  # evicted by another process just now: fetch it again
                pass
        self.root.mkdir(parents=True, exist_ok=True)
        # A name of its own (a cache shared by nodes may see the same pid twice); renamed once verified.
        handle, tmp = tempfile.mkstemp(dir=self.root, prefix=f"{local.name}.", suffix=".part")
        tmp = Path(tmp)
        digest = hashlib.sha256()
        try:
            with open(handle, "wb") as out, source.open("rb") as src:
                for block in iter(lambda: src.read(8 << 20), b""):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != sha256:
                raise ShardError(f"token shard {source}: sha256 differs from its manifest (altered or corrupt); "
                                 f"`megacore data prepare` rewrites it")
            os.replace(tmp, local)
        except FileNotFoundError:
            raise ShardError(f"token shard missing: {source} (named in its manifest)") from None
        finally:
            tmp.unlink(missing_ok=True)
        self.downloads += 1
        self._evict(keep=local)
        return local

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used shards until the cache fits (one directory scan per download)."""
        files = []
        for entry in os.scandir(self.root):
            if entry.is_file() and not entry.name.endswith(".part"):
                stat = entry.stat()
                files.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size
