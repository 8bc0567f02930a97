"""The GPU fast path, variant by variant, on one device: tokens/s, MFU, peak memory, the attention
kernel used and host syncs per step. No data needed (random tokens; packed documents for the masked
variants).

The model is configs/llama3_1b.yaml's (a ~1.2B Llama with Llama 3's 128k vocabulary), built and
parallelized by megacore's own code on one rank (`parallelize`, `TorchTrainModule`, `Optimizers`), at seq
2048 and 8192. Variants, each against the first row (eager, the loss from full fp32 logits) of its
sequence length, in the same process:

    eager                       full logits, then cross-entropy (the loss before the chunked head)
    compile                     torch.compile per block, full-logits loss
    compile+fused               + the output head's chunked loss (compiled chunk)
    compile+fused+docmask       + document masking (FlexAttention on CUDA)
    compile+fused+selective_ac  + selective activation checkpointing
    compile+fused+full_ac       + full activation checkpointing
    compile+fused+float8        + float8 block linears (torchao; refused without sm89+)

    python bench/gpu.py            # on one H100/H200: about 6-8 minutes (on a CPU: --size small)
    python bench/gpu.py --smoke    # tiny shapes on whatever device is here (CPU: a few seconds, eager)
    python bench/gpu.py --size small --device cpu   # dim 256, 32k vocabulary, seq 1024: CPU figures

Each compiled variant compiles afresh (inductor's cache makes repeats cheaper); variants still to run
once --budget-s (480 s) has passed are listed as skipped, so the script ends within about 8 minutes.
MFU is against the device's dense datasheet peak (megacore/device.py), or on CPU a measured matmul.
peak GiB: CUDA's peak allocation of the variant (weights, optimizer state, activations); step GiB: the
peak allocated during one training step above what was held before it (on CPU from torch.profiler's
memory events), the part that the loss and attention variants change.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from report import record  # noqa: E402

from megacore.config import ConfigError, load_config  # noqa: E402
from megacore.device import check_float8, configure, peak_tflops, resolve_auto  # noqa: E402
from megacore.distributed import init_distributed, shutdown  # noqa: E402
from megacore.loss import FULL_LOGITS, FUSED, LanguageModelLoss  # noqa: E402
from megacore.model import Llama, flops_per_token  # noqa: E402
from megacore.monitor.host_syncs import HostSyncCounter  # noqa: E402
from megacore.monitor.memory import peak_allocated_during  # noqa: E402
from megacore.parallel.layout import Layout  # noqa: E402
from megacore.parallel.parallelize import autocast_policy, parallelize  # noqa: E402
from megacore.train.optim import Optimizers  # noqa: E402
from megacore.train.torch_module import TorchTrainModule  # noqa: E402

PEAKS: dict = {}
# Model shapes besides configs/llama3_1b.yaml's own (size 1b).
SIZES = {"1b": [],
         "small": ["model.dim=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=768",
                   "model.vocab_size=32768"],
         "smoke": ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=192",
                   "model.vocab_size=1024"]}
SEQS = {"1b": [2048, 8192], "small": [1024], "smoke": [128]}
VARIANTS = {
    "eager": dict(compile=False, fused=False),
    "compile": dict(compile=True, fused=False),
    "compile+fused": dict(compile=True),
    "compile+fused+docmask": dict(compile=True, docmask=True),
    "compile+fused+selective_ac": dict(compile=True, ac="selective"),
    "compile+fused+full_ac": dict(compile=True, ac="full"),
    "compile+fused+float8": dict(compile=True, float8=True),
}
# Profiler event name fragments -> the kernel's name (first match per event).
KERNELS = {"flash_attention_for_cpu": "cpu flash", "flash_attention": "flash", "efficient_attention": "mem-efficient",
           "cudnn_attention": "cudnn", "flex_attention": "flex", "attention_math": "math"}


def config(args, variant: dict, seq: int):
    overrides = [f"data.seq_len={seq}", f"model.max_seq_len={seq}", "train.global_batch_size=" + str(args.batch),
                 f"train.micro_batch_size={args.batch}", f"train.device={args.device}",
                 f"parallel.compile={str(variant.get('compile', False)).lower()}",
                 f"parallel.activation_checkpointing={variant.get('ac', 'none')}",
                 f"model.document_masking={str(variant.get('docmask', False)).lower()}",
                 f"train.float8={str(variant.get('float8', False)).lower()}", "train.mixed_precision=auto"]
    overrides += SIZES[args.size]
    return load_config(REPO / "configs/llama3_1b.yaml", overrides)


def batch_of(cfg, device: torch.device, docmask: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    b, t = cfg.train.micro_batch_size, cfg.data.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (b, t + 1), generator=gen)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    if docmask:  # documents of 256 .. 2048 tokens packed into each row
        rows = []
        for _ in range(b):
            pos, left = [], t
            while left > 0:
                n = min(left, int(torch.randint(256, 2049, (1,), generator=gen)))
                pos.append(torch.arange(n))
                left -= n
            rows.append(torch.cat(pos))
        batch["position_ids"] = torch.stack(rows)
    return {k: v.to(device) for k, v in batch.items()}


def attention_kernel(step, device: torch.device) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    found = set()
    for n in {e.name for e in prof.events()}:
        label = next((label for key, label in KERNELS.items() if key in n), None)
        if label is not None and "backward" not in n:
            found.add(label)
    return "+".join(sorted(found)) or "?"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(args, name: str, variant: dict, seq: int, env) -> dict:
    device = env.device
    try:
        cfg = config(args, variant, seq)
        resolve_auto(cfg, device)
        configure(cfg, device)
        check_float8(cfg, device)
    except ConfigError as e:
        return {"variant": name, "seq": seq, "skipped": str(e)}
    note = ""
    if cfg.parallel.compile and device.type == "cpu" and not args.compile_on_cpu:
        cfg.parallel.compile, note = False, " (eager on CPU)"  # a cold compile per variant: minutes on CPU
    torch._dynamo.reset()
    layout = Layout.resolve(cfg, 1)
    with torch.device("meta"):
        model = Llama(cfg.model)
    # The loss from full fp32 logits (the path before the chunked head) is the reference of "fused".
    loss = LanguageModelLoss(FUSED if variant.get("fused", True) else FULL_LOGITS, compiled=cfg.parallel.compile is True)
    par = parallelize(model, cfg, layout, layout.build_mesh(device.type), device, loss)
    module = TorchTrainModule(par.stages, layout, 0, device, loss, Optimizers(par.parts, cfg.optim, float8_fsdp=False),
                              amp=autocast_policy(cfg, layout, device), document_masking=cfg.model.document_masking)
    batch = batch_of(cfg, device, variant.get("docmask", False))
    tokens = batch["labels"].numel()

    def step():
        module.zero_grad()
        module.train_batch(batch, 1.0 / tokens)
        module.optim_step(cfg.optim.lr)

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    with HostSyncCounter() as syncs:
        step()
    step_bytes = peak_allocated_during(step, device)
    kernel = attention_kernel(step, device)
    key = (cfg.train.mixed_precision, cfg.train.tf32)
    if key not in PEAKS:  # measured once per precision (on CPU): every row divides by the same peak
        PEAKS[key] = peak_tflops(cfg, device)
    peak, source = PEAKS[key]
    tps = tokens / seconds
    mfu = tps * flops_per_token(cfg.model, seq) / 1e12 / peak
    total = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"
    return {"variant": name + note, "seq": seq, "tokens_per_s": tps, "mfu": mfu, "peak_gib": total,
            "step_gib": step_bytes / 2**30, "kernel": kernel,
            "host_syncs": syncs.count, "peak_source": source, "precision": cfg.train.mixed_precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps: checks the script runs")
    parser.add_argument("--size", choices=list(SIZES), help="model shapes (default: 1b on a GPU, small on CPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--compile-on-cpu", action="store_true", help="also run the compiled variants on CPU")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="skip the variants left once this many seconds have passed (default 8 minutes)")
    args = parser.parse_args()
    if args.smoke:
        args.size = "smoke"
    elif args.size is None:
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.size = "1b" if cuda else "small"
    args.seqs = SEQS[args.size]
    args.warmup, args.steps = {"smoke": (1, 2), "small": (2, 5), "1b": (5, 10)}[args.size]
    env = init_distributed(args.device)
    chosen = [v for v in args.variants.split(",") if v]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")
    print("| variant | seq | micro-batch | tokens/s | vs eager | MFU | peak GiB | step GiB | attention | host syncs/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    started = time.perf_counter()
    try:
        for seq in args.seqs:
            args.batch = {"smoke": 1, "small": 2}.get(args.size, 4 if seq <= 2048 else 1)
            reference = None
            for variant in chosen:
                if time.perf_counter() - started > args.budget_s:
                    print(f"| {variant} | {seq} | {args.batch} | skipped: past --budget-s {args.budget_s:g} | | | | | | |")
                    continue
                try:
                    row = run_variant(args, variant, VARIANTS[variant], seq, env)
                except torch.OutOfMemoryError:
                    row = {"skipped": "out of memory"}
                gc.collect()  # the variant's model and optimizer state, before the next one
                if env.device.type == "cuda":
                    torch.cuda.empty_cache()
                if "skipped" in row:
                    print(f"| {variant} | {seq} | {args.batch} | skipped: {row['skipped']} | | | | | | |", flush=True)
                    continue
                if reference is None:
                    reference, ref_row = row["tokens_per_s"], row
                    print(f"MFU against {row['peak_source']} ({row['precision']})")
                elif not args.smoke:
                    record(f"gpu.py {row['variant']}, seq {seq} ({name})",
                           f"{row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu']:.1%}, step {row['step_gib']:.3f} GiB",
                           f"eager: {reference:,.0f} tokens/s, step {ref_row['step_gib']:.3f} GiB",
                           f"{row['tokens_per_s'] / reference:.2f}x", "MFU >= 45% (1B, seq 2048, compile, bf16)")
                print(f"| {row['variant']} | {seq} | {args.batch} | {row['tokens_per_s']:,.0f} | "
                      f"{row['tokens_per_s'] / reference:.2f}x | {row['mfu']:.1%} | {row['peak_gib']} | "
                      f"{row['step_gib']:.3f} | "
                      f"{row['kernel']} | {row['host_syncs']} |", flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
