"""Durable locations a user names: a local path, or an object-store URL (s3://, gs://, az://, any fsspec
protocol), with the same guarantees.

Object stores have no rename and no append; an object appears whole when its upload completes. So a
directory written there is complete when its *last* file (a manifest) exists: writers upload every
other file first and the manifest last, and readers treat a prefix without its manifest as absent.

`location(p)` gives a `pathlib.Path` for a local path and a `upath.UPath` for a URL (the same API:
`/`, `.name`, `.parent`, `.read_text()`, `.is_file()`), so code that reads a location reads either.
What pathlib cannot do on a store (a fresh listing, an upload, a recursive delete) is here.

Credentials never pass through megacore: fsspec's backends take them from the environment or the
provider's chain (AWS_* variables, ~/.aws, instance roles; GOOGLE_APPLICATION_CREDENTIALS; AZURE_*).
`check_access` makes one cheap request per location before any process starts, and its error names the
URL and the cause, never a key.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

from megacore.errors import StorageError

Location = Union[Path, "UPath"]  # noqa: F821 (upath is imported only when a URL is used)

_LOCAL_PROTOCOLS = ("", "file", "local")


def cache_root() -> Path:
    """This node's cache of what object storage holds (shards, staging, published models, run files):
    $MEGACORE_CACHE, else ~/.cache/megacore."""
    return Path(os.environ.get("MEGACORE_CACHE") or Path.home() / ".cache" / "megacore")


def cache_dir_for(kind: str, url) -> Path:
    """This node's cache directory for one thing of a kind ("models", "tokenizers", ...) that `url` names."""
    return cache_root() / kind / hashlib.sha256(str(url).encode()).hexdigest()[:16]


def is_url(path) -> bool:
    """Whether `path` names an object store (or any non-local fsspec filesystem)."""
    text = str(path)
    return "://" in text and text.split("://", 1)[0] not in _LOCAL_PROTOCOLS


def location(path) -> Location:
    """A Path for a local path, a UPath for a URL (a UPath given is returned as it is)."""
    if not is_url(path):
        return Path(str(path).removeprefix("file://"))
    from upath import UPath

    return path if isinstance(path, UPath) else UPath(str(path))


def listing(path: Location) -> list[Location]:
    """The entries directly under `path` as they are now (a store's listing cache is dropped first: another
    process may have written since); [] when there is nothing there."""
    if isinstance(path, Path):
        return sorted(path.iterdir()) if path.is_dir() else []
    path.fs.invalidate_cache(path.path)
    try:
        names = path.fs.ls(path.path, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(type(path)(f"{path.protocol}://{name.rstrip('/')}", **path.storage_options) for name in names)


def tree(path: Location) -> dict[str, dict]:
    """{relative name: fsspec's info (size, and a store's ETag)} of every file under `path`, as it is now
    (one recursive listing on a store)."""
    if isinstance(path, Path):
        return {str(f.relative_to(path)): {"size": f.stat().st_size} for f in path.rglob("*") if f.is_file()}
    path.fs.invalidate_cache(path.path)
    found = path.fs.find(path.path, detail=True)
    return {name[len(path.path):].lstrip("/"): info for name, info in found.items() if info["type"] == "file"}


def exists(path: Location) -> bool:
    if isinstance(path, Path):
        return path.exists()
    path.fs.invalidate_cache(path.path)
    return path.fs.exists(path.path)


def remove_tree(path: Location) -> None:
    """Delete a directory or prefix and everything under it (nothing there: nothing done)."""
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.fs.rm(path.path, recursive=True)
    except FileNotFoundError:
        pass
    path.fs.invalidate_cache(path.path)


def remove_file(path: Location) -> None:
    if isinstance(path, Path):
        path.unlink(missing_ok=True)
        return
    try:
        path.fs.rm_file(path.path)
    except FileNotFoundError:
        pass


def upload(local: Path, dest: Location) -> None:
    """Copy one local file to `dest` (a store's object appears whole, or not at all)."""
    if isinstance(dest, Path):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest)
        return
    dest.fs.put_file(str(local), dest.path)


def upload_tree(local: Path, dest: Location, last: tuple[str, ...] = ()) -> None:
    """Every file under `local` to the same relative names under `dest`; the names in `last` after all the
    others, in that order (the manifest that makes the rest exist for readers)."""
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    for rel in [r for r in files if r not in last] + [r for r in last if r in files]:
        upload(local / rel, location(dest) / rel)


def download(src: Location, local: Path) -> None:
    """Copy one file here, atomically (a crash leaves no partial file under the final name)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=local.parent, prefix=f"{local.name}.", suffix=".part")
    os.close(handle)
    tmp = Path(tmp)
    try:
        if isinstance(src, Path):
            shutil.copyfile(src, tmp)
        else:
            src.fs.get_file(src.path, str(tmp))
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


def download_tree(src: Location, local: Path) -> Path:
    """Every file under `src` into `local` (a published model's directory, say); returns `local`."""
    src = location(src)
    if isinstance(src, Path):
        shutil.copytree(src, local, dirs_exist_ok=True)
        return local
    for rel in tree(src):
        download(src / rel, local / rel)
    return local


def sha256_and_size(path: Location) -> tuple[str, int]:
    """sha256 of a file, streamed (a store's object is read once, never kept whole in memory)."""
    # One 1 MiB buffer, read into (not a new block per read): hashing a checkpoint on a few threads costs
    # a few MiB, whatever the checkpoint's size (export and consolidate stay far below the model's bytes).
    digest, size, buffer = hashlib.sha256(), 0, bytearray(1 << 20)
    view = memoryview(buffer)
    with path.open("rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def check_access(url: str, what: str, write: bool = False) -> None:
    """A cheap request or two to prove that `url`'s endpoint answers, the credentials are accepted and the
    bucket exists: a listing of the URL's own prefix (and, when nothing is there yet, a look at the bucket);
    with `write`, a zero-byte object written under the prefix and deleted. StorageError naming `what` and the
    URL otherwise. Local paths and non-bucket protocols (memory://) are not checked here."""
    if not is_url(url):
        return
    path = location(url)
    try:
        fs = path.fs
    except (ImportError, ValueError) as e:  # no backend installed for this protocol
        raise StorageError(f"{what}={url}: {e}") from None
    if path.protocol in ("memory",):
        return
    bucket = path.path.split("/", 1)[0]
    try:
        fs.invalidate_cache(path.path)
        try:
            fs.ls(path.path, refresh=True)
        except FileNotFoundError:  # nothing there yet; but is there a bucket?
            fs.info(bucket)
        if write:
            probe = f"{path.path.rstrip('/')}/.megacore-write-check"
            fs.pipe(probe, b"")
            fs.rm_file(probe)
    except FileNotFoundError:
        raise StorageError(f"{what}={url}: bucket {bucket!r} does not exist (create it first)") from None
    except PermissionError as e:
        raise StorageError(f"{what}={url}: access denied ({_cause(e)}): check the credentials in the environment "
                           f"or the provider's configuration") from None
    except Exception as e:  # the backends raise their own types for network and credential faults
        raise StorageError(f"{what}={url}: cannot reach the store ({_cause(e)}): check the endpoint "
                           f"(AWS_ENDPOINT_URL for S3-compatible stores) and the credentials") from None


def _cause(error: Exception) -> str:
    """A one-line cause, named by type (botocore's messages name endpoints and key ids, never secrets)."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
