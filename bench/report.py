"""The table `make bench` ends with: every benchmark's headline figures, one row each, in the form
BENCHMARKS.md keeps (date, benchmark, figure, reference, ratio, goal), under the machine's description.

Benchmarks call `record(...)`; rows collect in .cache/bench/results.jsonl, which `make bench` empties
first. `python bench/report.py` prints the table.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / ".cache" / "bench" / "results.jsonl"


def record(bench: str, figure: str, reference: str, ratio: str, goal: str = "") -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    row = {"date": datetime.date.today().isoformat(), "bench": bench, "figure": figure, "reference": reference,
           "ratio": ratio, "goal": goal}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem:.0f} GiB{gpu}; Linux {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.is_file() else []
    print(f"\nmachine: {machine()}\n")
    print("| date | benchmark | figure | reference | ratio | goal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['date']} | {r['bench']} | {r['figure']} | {r['reference']} | {r['ratio']} | {r['goal']} |")


if __name__ == "__main__":
    main()
