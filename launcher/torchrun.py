"""Running `megacore` under torchrun on this machine (`megacore train --nproc N`)."""

from __future__ import annotations

import subprocess
import sys


def torchrun_argv(nproc: int, cli_args: list[str]) -> list[str]:
    """torchrun with a private rendezvous on a free local port (--standalone), running `megacore CLI_ARGS`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megacore.cli", *cli_args]


def run_local(nproc: int, cli_args: list[str]) -> int:
    """Run and wait; returns torchrun's exit status (non-zero if any rank failed)."""
    return subprocess.call(torchrun_argv(nproc, cli_args))
