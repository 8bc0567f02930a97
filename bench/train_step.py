"""Trainer overhead and MFU on one process, against a bare PyTorch loop in the same script.

Reference: the same Llama on the same batches (the first ones of the prepared Shakespeare store), a
loop of forward, F.cross_entropy, backward and torch.optim.AdamW with its defaults, nothing else.
Measured: megacore's real trainer (`megacore.train.trainer.train`, one process: loader, loss
normalisation, all-reduces, clipping, the schedule, metrics, an eval and a checkpoint at the end) with
its tokens/s read from metrics.jsonl after warm-up. The two alternate for a few rounds and each keeps
its best round, since a shared machine only ever slows a run down. MFU is against the best
square matmul throughput measured in this script (fp32 on CPU, on this process's threads; bf16 on a GPU).

    python bench/train_step.py [--dim 512] [--layers 4] [--seq 256] [--batch 8] [--no-compile]

On a GPU (the default when CUDA is there) both loops run in bf16 autocast and the peak is a bf16
matmul; e.g. `--dim 2048 --layers 16 --seq 2048 --batch 4` is a ~1B model.

Needs `megacore data prepare configs/tiny.yaml` (make bench does it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import record

from data_pipeline.loader import PackedLoader, TokenStore
from megacore.config import load_config
from megacore.model import Llama, flops_per_token
from megacore.monitor.throughput import measure_matmul_tflops
from megacore.train.trainer import train

REPO = Path(__file__).resolve().parent.parent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(cfg, batches: list[dict], warmup: int, steps: int, fused: bool, device: torch.device) -> float:
    """tokens/s of the plain loop after `warmup` steps; batches cycle."""
    torch.manual_seed(cfg.train.seed)
    with device:
        model = Llama(cfg.model)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.mixed_precision == "bf16"
           else contextlib.nullcontext())
    if cfg.parallel.compile:
        for block in model.layers.values():
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                            fused=True if fused else None)
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        batch = batches[i % len(batches)]
        with amp:
            logits = model(batch["input_ids"].to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].to(device).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return steps * batches[0]["input_ids"].numel() / (time.perf_counter() - start)


def steady_tokens_per_s(metrics_jsonl: Path, first: int, last: int) -> float:
    """tokens/s over the train records logged at steps first..last, whose windows hold equal token counts."""
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in records if r["kind"] == "train" and first <= r["step"] <= last]
    return len(windows) / sum(1 / tps for tps in windows)  # equal tokens per window: the harmonic mean


def trainer_run(cfg, warmup: int, steps: int, run_dir: Path) -> float:
    """tokens/s of megacore's trainer over the steps after warm-up (from its metrics.jsonl windows)."""
    cfg.train.run_dir = str(run_dir)
    cfg.train.steps = warmup + steps
    cfg.logging.log_every = warmup  # the first window is the warm-up; `steps` must be a multiple of it
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's console lines; its metrics.jsonl is read
        train(cfg)
    return steady_tokens_per_s(run_dir / "metrics.jsonl", warmup + 1, cfg.train.steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the trainer's log windows)")

    cfg = load_config(REPO / "configs/tiny.yaml", [
        f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.n_heads={args.dim // 64}",
        f"model.n_kv_heads={max(1, args.dim // 128)}", f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}",
        f"data.dir={REPO / 'data/shakespeare'}", f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}", "train.eval_batches=1", "optim.warmup_steps=1",
        f"train.device={args.device}", f"train.mixed_precision={'bf16' if args.device == 'cuda' else 'fp32'}"])
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    store = TokenStore(cfg.data.dir, "train")
    cfg.model.vocab_size = store.manifest["tokenizer"]["vocab_size"]
    loader = PackedLoader(store, args.seq, args.batch, 0, 1, cfg.train.seed)
    batches = [loader.next_batch() for _ in range(4)]
    peak = max(measure_matmul_tflops(device, dtype, seconds=1.0) for _ in range(2))
    cfg.train.peak_tflops = peak
    per_token = flops_per_token(cfg.model, args.seq)
    print(f"model dim {args.dim}, {args.layers} layers, seq {args.seq}, batch {args.batch}: "
          f"{per_token / 1e6:.1f} MFLOP/token; {args.device}, {dtype}, {torch.get_num_threads()} threads; "
          f"matmul peak {peak:.3f} TFLOP/s (best of bursts)")

    rows = []
    variants = [False] if args.no_compile else [False, True]
    for compiled in variants:
        cfg.parallel.compile = compiled
        best = {"bare": 0.0, "bare_fused": 0.0, "megacore": 0.0, "no_health": 0.0}
        for _r in range(args.rounds):
            best["bare"] = max(best["bare"], bare_loop(cfg, batches, args.warmup, args.steps, False, device))
            best["bare_fused"] = max(best["bare_fused"], bare_loop(cfg, batches, args.warmup, args.steps, True, device))
            with tempfile.TemporaryDirectory() as tmp:
                best["megacore"] = max(best["megacore"], trainer_run(cfg, args.warmup, args.steps, Path(tmp) / "run"))
            with tempfile.TemporaryDirectory() as tmp:  # run health off: no step verdicts, no watchdog
                off = dataclasses.replace(cfg, health=dataclasses.replace(cfg.health, checks=False, hang_timeout_s=0))
                best["no_health"] = max(best["no_health"], trainer_run(off, args.warmup, args.steps, Path(tmp) / "run"))
            peak = max(peak, measure_matmul_tflops(device, dtype, seconds=1.0))
        rows.append((compiled, best))

    print(f"\nmatmul peak over the whole script: {peak:.3f} TFLOP/s")
    print("| variant | loop | tokens/s | MFU | megacore / loop |")
    print("| --- | --- | --- | --- | --- |")
    for compiled, best in rows:
        name = "torch.compile per block" if compiled else "eager"
        for loop in ("bare", "bare_fused", "no_health", "megacore"):
            label = {"bare": "bare loop, default AdamW", "bare_fused": "bare loop, fused AdamW",
                     "no_health": "megacore trainer, run health off", "megacore": "megacore trainer"}[loop]
            mfu = best[loop] * per_token / 1e12 / peak
            print(f"| {name} | {label} | {best[loop]:,.0f} | {mfu:.1%} | {best['megacore'] / best[loop]:.3f} |")
        what = f"trainer step, d{args.dim} x {args.layers} layers, seq {args.seq}, batch {args.batch}, {name}"
        bare = max(best["bare"], best["bare_fused"])
        record(what, f"{best['megacore']:,.0f} tokens/s, MFU {best['megacore'] * per_token / 1e12 / peak:.1%}",
               f"bare loop (best of default/fused AdamW): {bare:,.0f} tokens/s", f"{best['megacore'] / bare:.3f}x",
               "overhead < 5%, MFU >= 50%")
        record(f"run health's step checks, {what.split(', ', 1)[1]}", f"{best['megacore']:,.0f} tokens/s",
               f"health.checks=false, no watchdog: {best['no_health']:,.0f} tokens/s",
               f"{best['megacore'] / best['no_health']:.3f}x", "within 2%")


if __name__ == "__main__":
    main()
