"""Running `megacore` under torchrun on this machine (`megacore train --nproc N`)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# torchrun's workers share a key-value store that its agent hosts and that outlives a restart; torch
# gives them no per-restart prefix, so a restarted group read the dead group's gloo addresses
# ("connectFullMesh ... Connection refused") or its finished barriers (a hang). With this variable the
# agents give every rendezvous round a fresh store. `train --nproc` and the sbatch template set it.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun_argv(nproc: int, cli_args: list[str], max_restarts: int = 0) -> list[str]:
    """torchrun with a private rendezvous on a free local port (--standalone), running `megacore CLI_ARGS`.

    With max_restarts > 0, a failed rank (a crash, a kill -9) makes torchrun restart the whole group,
    which then resumes from the newest good checkpoint."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "megacore.cli", *cli_args]


def threads_per_rank(nproc: int) -> int:
    """This machine's usable cores shared out among the ranks (torchrun alone would give each rank 1)."""
    return max(1, len(os.sched_getaffinity(0)) // nproc)


# A rank that stops on an error the user can act on (megacore: error: ..., exit 2) writes its message
# here; torchrun itself only exits 1, so `run_local` passes the 2 on.
ERROR_FILE_ENV = "MEGACORE_ERROR_FILE"


def run_local(nproc: int, cli_args: list[str], max_restarts: int = 0) -> int:
    """Run and wait; returns torchrun's exit status (non-zero if any rank failed for good; 2 when a rank
    stopped on a usage, config or data error). A user's OMP_NUM_THREADS wins over the even share of
    the cores."""
    with tempfile.TemporaryDirectory(prefix="megacore-") as tmp:
        error_file = Path(tmp) / "error"
        env = {"OMP_NUM_THREADS": str(threads_per_rank(nproc)), **os.environ, **TORCHRUN_ENV,
               ERROR_FILE_ENV: str(error_file)}
        status = subprocess.call(torchrun_argv(nproc, cli_args, max_restarts), env=env)
        return 2 if status != 0 and error_file.is_file() else status
