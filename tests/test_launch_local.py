"""The local launch, `megacore train --nproc N` (torchrun inside megacore's launcher): what the user sees
when a rank fails. A rank that stops on an error the user can act on gives its one message and exit
status 2, nothing else; a rank that crashes keeps torchrun's whole report."""

import subprocess
import sys
import time

from data_pipeline.shards import read_manifest
from tests.helpers import REPO, megacore, rank_processes


def test_a_rank_stopped_by_a_bit_flipped_shard_shows_its_one_message_and_exit_2(prepared_copy, tiny_args):
    shard = prepared_copy / read_manifest(prepared_copy)["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    args = tiny_args("run", f"data.dir={prepared_copy}", "train.steps=2")
    proc = megacore("train", *args, "--nproc", "2", check=False)
    message = (f"megacore: error: token shard {shard}: sha256 differs from its manifest (altered or corrupt); "
               f"`megacore data verify {prepared_copy}` lists every bad file, `data prepare` rewrites them\n")
    assert proc.returncode == 2
    assert proc.stderr == message, proc.stderr  # no agent log lines, no ChildFailedError, no failure table
    assert "Traceback" not in proc.stdout


def test_a_crashed_rank_keeps_torchruns_report(tiny_args, tmp_path):
    args = tiny_args("run", "train.steps=400", "checkpoint.enabled=false")
    proc = subprocess.Popen([sys.executable, "-m", "megacore", "train", *args, "--nproc", "2"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)
    ranks = rank_processes(proc.pid)
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    ranks[1].kill()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "ChildFailedError" in stderr and "exitcode  : -9" in stderr and "megacore: error" not in stderr, stderr
