"""Scaling on CPU: tokens/s of `megacore train` on 1, 2 and 4 ranks with each parallelism, and the
share of time spent in communication.

Reference, in the same script: the same model and global batch on one process (all cores). Each
layout is a real `megacore train --nproc N` run (torchrun, gloo) of the demo model; tokens/s comes
from its metrics.jsonl after warm-up, and the communication share from torch.profiler over two later
steps (logging.profile_start: the union of collective intervals over wall time, busiest rank). The
ranks share this machine's cores (`--nproc` gives each cores/N threads), so on a 2-core machine the
ideal ratio is 1.0 for every layout: what is measured is the cost of each parallelism, not a speed-up.
With pipeline parallelism the share includes the bubble: a stage waiting in recv for its neighbour.

    python bench/scaling.py [--steps 8] [--dim 256] [--seq-len 256] [--only fsdp2 tp2 ...]

Context parallelism at a long sequence: `--seq-len 2048 --only cp2 "1 rank documents" "cp2 documents"`
(the plain 1-rank run is always the reference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from report import record
from train_step import steady_tokens_per_s

REPO = Path(__file__).resolve().parent.parent

# name: (ranks, overrides)
LAYOUTS = {
    "1 rank": (1, []),
    "fsdp2": (2, ["parallel.dp_shard=2"]),
    "ddp2 (replicate)": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    "tp2": (2, ["parallel.tp=2", "parallel.dp_shard=1"]),
    "pp2 1f1b": (2, ["parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch_size=4"]),
    "zero2 deepspeed": (2, ["parallel.backend=deepspeed", "parallel.zero_stage=2"]),
    "fsdp4": (4, ["parallel.dp_shard=4", "train.micro_batch_size=4"]),
    "hsdp 2x2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "train.micro_batch_size=4"]),
    "fsdp2 x tp2": (4, ["parallel.dp_shard=2", "parallel.tp=2"]),
    "pp2 x fsdp2": (4, ["parallel.pp=2", "parallel.dp_shard=2", "train.micro_batch_size=4"]),
    "cp2": (2, ["parallel.cp=2", "parallel.dp_shard=1"]),
    "cp2 documents": (2, ["parallel.cp=2", "parallel.dp_shard=1", "model.document_masking=true"]),
    "1 rank documents": (1, ["model.document_masking=true"]),
}


def run(name: str, nproc: int, overrides: list[str], args, workdir: Path) -> dict:
    run_dir = workdir / name.replace(" ", "_")
    warmup, measured = 2, args.steps
    total = warmup + measured + 2  # two more steps under the profiler, which slows what it watches
    cmd = [sys.executable, "-m", "megacore.cli", "train", str(REPO / "configs/tiny.yaml"), "--nproc", str(nproc),
           f"data.dir={REPO / 'data/shakespeare'}", f"train.run_dir={run_dir}", f"train.steps={total}",
           f"model.dim={args.dim}", f"logging.log_every={warmup}", "train.eval_batches=1",
           f"data.seq_len={args.seq_len}", f"model.max_seq_len={max(args.seq_len, 1024)}",
           f"logging.profile_start={warmup + measured + 1}", "logging.profile_steps=2", *overrides]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name}: megacore train failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    tps = steady_tokens_per_s(run_dir / "metrics.jsonl", warmup + 1, warmup + measured)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mfu = next(r["mfu"] for r in records if r["kind"] == "train" and r["step"] == warmup + measured)
    profile = json.loads((run_dir / "profile/summary.json").read_text())["ranks"]
    return {"tokens_per_s": tps, "mfu": mfu,
            "communication_share": max(r["communication_share"] for r in profile)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6, help="measured steps after 2 warm-up steps (even)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (context parallelism: longer)")
    parser.add_argument("--only", nargs="*", default=None, help="layout names (default: all)")
    args = parser.parse_args()
    names = args.only or list(LAYOUTS)
    cores = len(os.sched_getaffinity(0))
    print(f"demo model (configs/tiny.yaml) with model.dim={args.dim}, global batch 16 x {args.seq_len} tokens; "
          f"{cores} cores")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["1 rank"] + [n for n in names if n != "1 rank"]:
            nproc, overrides = LAYOUTS[name]
            results[name] = run(name, nproc, overrides, args, Path(tmp))
            r = results[name]
            print(f"  {name}: {r['tokens_per_s']:,.0f} tokens/s, communication {r['communication_share']:.1%}",
                  flush=True)
    ref = results["1 rank"]["tokens_per_s"]
    # MFU against the whole machine: the 1-rank run's peak is measured on all cores (each rank of a
    # larger run measures its own share while the others also run, which is not a stable figure).
    mfu_per_token_s = results["1 rank"]["mfu"] / ref
    print("\n| layout | ranks | tokens/s | vs 1 rank | MFU (machine) | communication share |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {LAYOUTS[name][0]} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / ref:.2f} | "
              f"{r['tokens_per_s'] * mfu_per_token_s:.1%} | {r['communication_share']:.1%} |")
        if name != "1 rank":
            record(f"scaling, {name} ({LAYOUTS[name][0]} ranks on {cores} cores)",
                   f"{r['tokens_per_s']:,.0f} tokens/s, communication {r['communication_share']:.0%}",
                   f"1 rank: {ref:,.0f} tokens/s", f"{r['tokens_per_s'] / ref:.2f}x")


if __name__ == "__main__":
    main()
