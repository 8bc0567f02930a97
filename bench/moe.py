"""Mixtures of experts on CPU: the grouped GEMM against a loop over experts, and training tokens/s of the
demo model with MoE layers on 1 rank, on FSDP over 2 and with expert parallelism over 2.

1. Forward and backward of the experts (`expert_swiglu`) on tokens already sorted by expert, with a
   Zipf-like skew of tokens per expert (some experts idle): `torch._grouped_mm` against one matmul
   chain per expert, the same inputs, one thread. Reference: the loop.
2. Real `megacore train` runs (bench/scaling.py's runner: torchrun, gloo, profiler): the 1-rank MoE run is
   the reference; on a 2-core machine the ideal ratio is 1.0 (the ranks share the cores), so what is
   measured is the cost of the all-to-all and FSDP.

    python bench/moe.py [--steps 6] [--only kernel|train]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from report import record  # noqa: E402
from scaling import run  # noqa: E402

from megacore.model.moe import expert_swiglu  # noqa: E402

SHAPES = [(8, 256, 512, 4096), (64, 256, 128, 8192)]  # (experts, dim, hidden, tokens x k)
MOE = ["model.family=mixtral", "model.n_experts=8", "model.n_active_experts=2", "model.moe_ffn_dim=256",
       "model.moe_aux_loss_coef=0.001"]
LAYOUTS = {"moe 1 rank": (1, MOE), "moe fsdp2": (2, [*MOE, "parallel.dp_shard=2"]),
           "moe ep2": (2, [*MOE, "parallel.dp_shard=2", "parallel.ep=2"])}


def _time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _step(x, counts, w1, w2, w3, grad, grouped: bool) -> None:
    out = expert_swiglu(x, counts, w1, w2, w3, grouped=grouped)
    torch.autograd.grad(out, [x, w1, w2, w3], grad)


def kernel() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    for experts, dim, hidden, rows in SHAPES:
        share = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64)
        share[experts // 2::3] = 0  # some experts get nothing
        counts = (share / share.sum() * rows).floor().long()
        counts[0] += rows - counts.sum()
        w1, w3 = (torch.randn(experts, hidden, dim, generator=g, requires_grad=True) for _ in range(2))
        w2 = torch.randn(experts, dim, hidden, generator=g, requires_grad=True)
        x = torch.randn(rows, dim, generator=g, requires_grad=True)
        grad = torch.randn(rows, dim, generator=g)

        inputs = (x, counts, w1, w2, w3, grad)
        loop, grouped = (_time(functools.partial(_step, *inputs, g)) for g in (False, True))
        name = f"{experts} experts, dim {dim}, hidden {hidden}, {rows} token-choices"
        print(f"  {name}: grouped {grouped * 1e3:.1f} ms, loop {loop * 1e3:.1f} ms: {loop / grouped:.2f}x")
        record(f"moe experts forward+backward, {name} (1 thread)", f"grouped GEMM {grouped * 1e3:.1f} ms",
               f"loop over experts {loop * 1e3:.1f} ms", f"{loop / grouped:.2f}x")


def train(steps: int) -> None:
    cores = len(os.sched_getaffinity(0))
    args = argparse.Namespace(steps=steps, dim=256, seq_len=256)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (nproc, overrides) in LAYOUTS.items():
            results[name] = run(name, nproc, overrides, args, Path(tmp))
            r = results[name]
            print(f"  {name}: {r['tokens_per_s']:,.0f} tokens/s, communication {r['communication_share']:.1%}",
                  flush=True)
    ref = results["moe 1 rank"]["tokens_per_s"]
    for name, r in results.items():
        if name != "moe 1 rank":
            record(f"scaling, {name} ({LAYOUTS[name][0]} ranks on {cores} cores; 8 experts, top 2)",
                   f"{r['tokens_per_s']:,.0f} tokens/s, communication {r['communication_share']:.0%}",
                   f"MoE on 1 rank: {ref:,.0f} tokens/s", f"{r['tokens_per_s'] / ref:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", choices=["kernel", "train"], default=None)
    args = parser.parse_args()
    if args.only in (None, "kernel"):
        kernel()
    if args.only in (None, "train"):
        train(args.steps)


if __name__ == "__main__":
    main()
