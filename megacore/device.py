"""What the training device can do, and the defaults that follow: precision, TF32, compile, float8,
and the peak TFLOP/s that MFU is measured against.

`train.mixed_precision=auto` is bf16 where the device computes it natively (CUDA GPUs from Ampere on)
and fp32 elsewhere (CPUs like ours have no bf16 units: bf16 matmuls run ~90x slower there).
`parallel.compile=auto` compiles on CUDA (blocks, and the loss with the output head), not on CPU (a
cold compile costs ~30 s there, more than a short CPU run gains). fp32 matmuls on CUDA use TF32
unless `train.tf32=false`.

MFU on CUDA is measured against the device's dense peak from its datasheet (no sparsity), looked up
by device name; `train.peak_tflops` overrides it, and an unknown GPU or a CPU falls back to a matmul
measured at start (on a CPU that is the honest peak: a vendor number ignores the clock and threads the
rank really has).
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from megacore.config import Config
from megacore.errors import ConfigError

# Dense TFLOP/s per GPU: (bf16, tf32). Longer, more specific names first (H100 PCIe before H100).
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("GB200", 2500.0, 1250.0),
    ("B200", 2250.0, 1100.0),
    ("H200", 989.0, 494.5),
    ("GH200", 989.0, 494.5),
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 417.5),
    ("H100", 989.0, 494.5),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0, 494.5),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L4", 121.0, 60.0),
    ("A10G", 70.0, 35.0),
    ("A10", 125.0, 62.5),
    ("MI300X", 1307.0, 653.7),
    ("MI250X", 383.0, 191.5),
]

FLOAT8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper onward have float8 tensor cores


def peak_from_name(name: str, bf16: bool) -> float | None:
    for key, bf16_peak, tf32_peak in PEAK_TFLOPS:
        if key in name:
            return bf16_peak if bf16 else tf32_peak
    return None


def resolve_auto(cfg: Config, device: torch.device) -> None:
    """Replace `auto` in train.mixed_precision and parallel.compile by what `device` should run."""
    cuda = device.type == "cuda"
    if cfg.train.mixed_precision == "auto":
        cfg.train.mixed_precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if cfg.parallel.compile == "auto":
        # (Mixtures of experts stay eager: the tokens per expert and rank change every step, and each new
        # size would compile again; parallel.compile=true asks for it anyway.)
        cfg.parallel.compile = cuda and cfg.parallel.backend == "torch" and not cfg.model.moe


def configure(cfg: Config, device: torch.device) -> None:
    """Settings of the process for this device: TF32 for fp32 matmuls and convolutions on CUDA; on CPU,
    glibc's mmap threshold (`cpu_mmap_threshold`)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    elif device.type == "cpu":
        set_mmap_threshold(cpu_mmap_threshold(cfg))


def set_mmap_threshold(threshold: int) -> None:
    """glibc's malloc maps every buffer from `threshold` bytes on by itself and returns it when freed
    (`cpu_mmap_threshold` says why that matters). Also what `export-hf` and `checkpoints consolidate`
    set (1 MiB): they allocate and free one tensor after another, which glibc's default would keep in a
    fragmented heap (a 181 MB model's consolidation held 130 MB more). MALLOC_MMAP_THRESHOLD_ in the
    environment wins."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or sys.platform != "linux":
        return
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):  # glibc (musl has none: nothing to set)
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * threshold)  # (what glibc's own adjustment pairs with it)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


def cpu_mmap_threshold(cfg: Config) -> int:
    """Bytes from which glibc's malloc (torch's CPU allocator) maps a buffer of its own, returned to the
    system when freed. glibc's default raises the threshold to the size of each large buffer freed, up
    to 32 MiB; FSDP's per-block gathers and gradients then come from the heap, which keeps their freed
    memory, fragmented: a rank of a 310M-parameter model on 4 CPU ranks held 0.5 GiB above what it
    used. A fixed threshold below those buffers returns them, but buffers above it cost page faults at
    each use: set at every micro-batch's activations, it slowed the tiny demo by 24%. So: twice the
    largest activation of a micro-batch (a token row of the MLP, or the loss's chunk of logits), at least
    1 MiB and at most glibc's own maximum. MALLOC_MMAP_THRESHOLD_ in the environment wins."""
    from megacore.loss import chunk_rows
    from megacore.model.llama import ffn_hidden_dim

    m = cfg.model
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    width = max(m.dim, ffn_hidden_dim(m), m.n_heads * m.head_size)
    largest = 4 * max(tokens * width, min(tokens, chunk_rows(m.vocab_size)) * m.vocab_size)
    return int(min(max(2 * largest, 1 << 20), 32 << 20))


def check_supported(cfg: Config, device: torch.device) -> None:
    """What this device cannot run of the config, refused with the reason before the model is built."""
    if device.type == "cuda" and (cfg.model.document_masking or cfg.parallel.cp > 1) and cfg.model.dropout > 0:
        why = "model.document_masking" if cfg.model.document_masking else f"parallel.cp={cfg.parallel.cp}"
        raise ConfigError(f"{why} on CUDA runs FlexAttention, which has no attention dropout: set model.dropout=0")
    check_float8(cfg, device)


def check_float8(cfg: Config, device: torch.device) -> None:
    """train.float8 needs torchao and a GPU with float8 tensor cores; refused with the reason elsewhere."""
    if not cfg.train.float8:
        return
    if device.type != "cuda":
        raise ConfigError(f"train.float8=true needs a CUDA GPU with compute capability >= "
                          f"{'.'.join(map(str, FLOAT8_MIN_CAPABILITY))} (H100, H200, L40S, B200); this run is on "
                          f"{device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_MIN_CAPABILITY:
        raise ConfigError(f"train.float8=true needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} "
                          f"has {capability[0]}.{capability[1]}")


def peak_tflops(cfg: Config, device: torch.device) -> tuple[float, str]:
    """(peak TFLOP/s per rank for MFU, where it came from)."""
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops, "train.peak_tflops"
    bf16 = cfg.train.mixed_precision == "bf16"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if not bf16 and not cfg.train.tf32:
            peak = None  # plain fp32: no table entry, measure
        else:
            peak = peak_from_name(name, bf16)
        if peak is not None:
            return peak, f"{name} dense {'bf16' if bf16 else 'tf32'} datasheet"
    from megacore.monitor.throughput import measure_matmul_tflops

    return measure_matmul_tflops(device, torch.bfloat16 if bf16 else torch.float32), "measured matmul"
