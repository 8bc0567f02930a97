"""The test suite's own rules: a missing Slurm fails the launcher tests unless skipping is asked for, a
failed multi-process run shows its first error before the rest, and the `processes` marker (what
`make test-fast` leaves out) is applied to every test that starts a process."""

import importlib
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests import conftest, helpers
from tests.helpers import REPO, failure_message, first_error

# What a 2-rank torchrun run whose rank 1 raised prints (torch 2.13, trimmed), stdout and stderr.
RANK_STDOUT = "rank 0 starting\nrank 1 starting\n" + "".join(f"step {i} | loss 4.2\n" for i in range(40))
RANK_STDERR = """\
Traceback (most recent call last):
  File "/tmp/fail.py", line 8, in <module>
    inner()
  File "/tmp/fail.py", line 7, in inner
    raise RuntimeError("boom on rank 1")
RuntimeError: boom on rank 1
W1203 19:52:41.473000 12858 torch/distributed/elastic/api.py:1028] Sending process 12863 closing signal SIGTERM
E1203 19:52:41.475000 12858 torch/distributed/elastic/api.py:1002] failed (exitcode: 1) local_rank: 1 of python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/venv/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
fail.py FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-03_19:52:41
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 12863)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 12863
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-03_19:52:41
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 12864)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_a_failed_run_shows_the_failing_ranks_error_first_then_a_short_tail():
    proc = subprocess.CompletedProcess(["torchrun", "fail.py"], 1, RANK_STDOUT, RANK_STDERR)
    message = failure_message(proc)
    first = message.split("--- stdout")[0]
    assert first.startswith("torchrun fail.py exited 1\n--- first error\nRoot Cause (first observed failure):")
    assert "rank      : 1 (local_rank: 1)" in first and "rank      : 0" not in first, "the root cause, not rank 0"
    assert first.rstrip().endswith('raise RuntimeError("boom on rank 1")\nRuntimeError: boom on rank 1')
    assert "ChildFailedError" not in first and "W1203" not in first, "torchrun's own traceback and logs are not it"
    assert len(message.splitlines()) < 60 and "step 39" in message and "step 20" not in message, "a short tail"


def test_a_users_error_line_and_prefixed_rank_output_are_found():
    assert first_error("noise\nmegacore: error: data.dir=/x: no manifest.json\nmore") == \
        "megacore: error: data.dir=/x: no manifest.json"
    output = ("[rank0]:ok\n[rank1]:Traceback (most recent call last):\n[rank0]:still fine\n"
              '[rank1]:  File "t.py", line 1, in <module>\n[rank1]:ValueError: bad\n[rank1]:\n[rank0]:done\n')
    assert first_error(output) == ('[rank1]:Traceback (most recent call last):\n[rank1]:  File "t.py", line 1, in '
                                   "<module>\n[rank1]:ValueError: bad")
    assert first_error("all well\n") == ""


def test_starting_a_process_from_a_test_without_the_marker_fails_naming_the_fix(monkeypatch):
    unmarked = SimpleNamespace(nodeid="tests/test_x.py::test_y", get_closest_marker=lambda name: None)
    monkeypatch.setattr(helpers, "running_test", unmarked)
    with pytest.raises(pytest.fail.Exception, match=r"test_y starts a `megacore` process but is not marked `processes`"):
        helpers.megacore("--help")


def test_the_marker_lists_name_tests_that_exist():
    for module in conftest.PROCESS_MODULES | conftest.PROCESS_TESTS.keys():
        assert (REPO / "tests" / f"{module}.py").is_file(), module
    for module, names in conftest.PROCESS_TESTS.items():
        tests = vars(importlib.import_module(f"tests.{module}"))
        assert not [name for name in names if not callable(tests.get(name))], module


@pytest.mark.processes
def test_a_missing_slurm_fails_the_launcher_tests_unless_skipping_is_asked_for(tmp_path):
    (tmp_path / "test_needs_slurm.py").write_text(
        "from tests.helpers import require_slurm\n\n\ndef test_job():\n    require_slurm('no-such-slurm-tool')\n")
    env = {k: v for k, v in os.environ.items() if k != "MEGACORE_SKIP_SLURM"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", str(tmp_path / "test_needs_slurm.py")]
    failed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "no-such-slurm-tool" in failed.stdout and "MEGACORE_SKIP_SLURM=1" in failed.stdout
    skipped = subprocess.run(cmd, cwd=tmp_path, env={**env, "MEGACORE_SKIP_SLURM": "1"}, capture_output=True,
                             text=True, timeout=120)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout
    assert "skipped because MEGACORE_SKIP_SLURM=1" in skipped.stdout, "pytest's summary says why"
