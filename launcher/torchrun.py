"""Running `megacore` under torchrun on this machine (`megacore train --nproc N`).

torchrun runs inside this module's `main` (`python -m launcher.torchrun TORCHRUN_ARGS`) so that the
launch is ours: when a rank stops on an error the user can act on (megacore: error: ..., exit 2), the
user sees that one message and exit status 2, not torchrun's agent logs, traceback and failure table;
any other failure (a crash, a kill) keeps torchrun's whole report.
"""

from __future__ import annotations

import logging
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

# A rank that stops on an error the user can act on writes its message into this directory (one file per
# rank) instead of printing it; the launcher prints each distinct message once.
ERROR_DIR_ENV = "MEGACORE_ERROR_DIR"


def under_torchrun() -> bool:
    """Whether this process is a rank that torchrun started (`--nproc N`, a Slurm job), not a plain command."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def torchrun_args(nproc: int, cli_args: list[str], max_restarts: int = 0) -> list[str]:
    """torchrun's arguments: a private rendezvous on a free local port (--standalone), running
    `megacore CLI_ARGS`.

    With max_restarts > 0, a failed rank (a crash, a kill -9) makes torchrun restart the whole group,
    which then resumes from the newest good checkpoint."""
    return ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", "-m", "megacore.cli",
            *cli_args]


def threads_per_rank(nproc: int) -> int:
    """This machine's usable cores shared out among the ranks (torchrun alone would give each rank 1)."""
    return max(1, len(os.sched_getaffinity(0)) // nproc)


def run_local(nproc: int, cli_args: list[str], max_restarts: int = 0) -> int:
    """Run and wait; returns the launch's exit status: 0, 2 when a rank stopped on a usage, config or data
    error, else torchrun's (non-zero when a rank failed for good). A user's OMP_NUM_THREADS wins over the
    even share of the cores."""
    with tempfile.TemporaryDirectory(prefix="megacore-errors-") as errors:
        env = {"OMP_NUM_THREADS": str(threads_per_rank(nproc)), **os.environ, **TORCHRUN_ENV, ERROR_DIR_ENV: errors}
        return subprocess.call([sys.executable, "-m", "launcher.torchrun",
                                *torchrun_args(nproc, cli_args, max_restarts)], env=env)


def report_user_error(message: str) -> bool:
    """Called by a rank that stops on a user error: under `run_local`, hand the message to the launcher
    (True); otherwise (plain torchrun, Slurm) the rank prints it itself (False)."""
    errors = os.environ.get(ERROR_DIR_ENV)
    if not errors or not Path(errors).is_dir():
        return False
    path = Path(errors) / f"rank-{os.environ.get('RANK', '0')}"
    partial = path.with_suffix(".tmp")
    partial.write_text(message)
    partial.replace(path)  # the launcher never reads half a message
    return True


HEALTH_STOP = "health-stop"


def report_health_stop() -> bool:
    """Called by a rank whose run stopped for its health (megacore/health/, status 3): tell the launcher,
    which gives the status, since the rank itself exits 0 (torchrun would restart a failed group)."""
    errors = os.environ.get(ERROR_DIR_ENV)
    if not errors or not Path(errors).is_dir():
        return False
    (Path(errors) / HEALTH_STOP).touch()
    return True


def user_errors(errors: Path) -> list[str]:
    """The distinct messages of the ranks that stopped on a user error, the first one's first."""
    files = sorted(errors.glob("rank-*[0-9]"), key=lambda p: p.stat().st_mtime_ns)
    return list(dict.fromkeys(p.read_text() for p in files))


def main(argv: list[str]) -> int:
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    errors = Path(os.environ[ERROR_DIR_ENV])
    # Once a rank has reported a user error, the agent's logs about stopping the others are noise. (torch
    # gives `torch` and `torch.distributed` handlers of their own.)
    loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict) if name.startswith("torch")]
    for handler in {h for logger in loggers for h in logger.handlers}:
        handler.addFilter(lambda record: not user_errors(errors))
    try:
        torchrun.main(argv)
    except ChildFailedError:
        messages = user_errors(errors)
        if not messages:
            raise  # torchrun's own report: traceback and failure table
        for message in messages:
            print(f"megacore: error: {message}", file=sys.stderr, flush=True)
        return 2
    return 3 if (errors / HEALTH_STOP).exists() else 0  # (3: megacore.health.events.EXIT_FATAL)


if __name__ == "__main__":
    from megacore.cli import exit_now

    exit_now(main(sys.argv[1:]))  # (not sys.exit: see megacore.cli.run)
