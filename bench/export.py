"""Peak memory of `export-hf` and `checkpoints consolidate` at a size: a ~300M-parameter Llama trained one
step on 4 FSDP ranks (real torchrun processes), then exported and consolidated by the `megacore` command
line, which streams the checkpoint tensor by tensor.

References, in the same script, on the same checkpoint: a bare process that imports torch and megacore
(what every figure is measured above), and today's whole-model export (the model loaded whole, then
written by safetensors' own writer) whose files the streamed ones equal byte for byte. Each figure is
the process's peak resident set size (ru_maxrss), measured by a wrapper process of its own.

    python bench/export.py [--dim 1024] [--layers 24] [--ranks 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import record

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
BARE = "import torch, megacore.commands, megacore.checkpoint.hf, megacore.checkpoint.weights, megacore.checkpoint.streaming"
# Today's export, kept here as the reference: the whole model in fp32, then safetensors' save_file.
WHOLE = """
import sys
from safetensors.torch import save_file
from megacore.checkpoint.hf import hf_state
from megacore.checkpoint.weights import load_trained
model = load_trained(sys.argv[1]).model
save_file({k: v.contiguous() for k, v in hf_state(model).items()}, sys.argv[2], metadata={"format": "pt"})
"""


def peak(*args: str) -> tuple[int, float]:
    """(peak resident bytes, seconds) of `python ARGS` as the only child of a fresh wrapper."""
    from megacore.monitor.memory import peak_resident_of

    start = time.perf_counter()
    bytes_, proc = peak_resident_of([PY, *args], cwd=REPO)
    proc.check_returncode()
    return bytes_, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--ranks", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="megacore-bench-export-") as tmp:
        tmp = Path(tmp)
        data, run = tmp / "data", tmp / "run"
        subprocess.run([PY, "-m", "megacore", "data", "prepare", "configs/tiny.yaml", f"data.dir={data}",
                        "data.vocab_size=2048"], cwd=REPO, check=True, capture_output=True)
        start = time.perf_counter()
        subprocess.run([PY, "-m", "megacore", "train", "configs/tiny.yaml", f"data.dir={data}", f"train.run_dir={run}",
                        f"model.dim={args.dim}", f"model.n_layers={args.layers}", "model.n_heads=16",
                        "model.n_kv_heads=8", "data.seq_len=32", "train.global_batch_size=4",
                        "train.micro_batch_size=1", "train.steps=1", "train.eval_every=1000", "train.peak_tflops=0.1",
                        "--nproc", str(args.ranks)], cwd=REPO, check=True, capture_output=True)
        print(f"trained 1 step on {args.ranks} FSDP ranks in {time.perf_counter() - start:.0f} s")
        import torch

        from megacore.checkpoint.weights import trained_config
        from megacore.model import Llama

        with torch.device("meta"):
            model = Llama(trained_config(run, verify=False)[0].model)
        n = sum(p.numel() for p in model.parameters())
        weights = 4 * n
        largest = 4 * max(p.numel() for p in model.parameters())
        print(f"model: {n / 1e6:.0f}M parameters, {weights / 2**20:.0f} MiB in fp32 (largest tensor "
              f"{largest / 2**20:.1f} MiB)")

        bare, _ = peak("-c", BARE)
        whole, whole_s = peak("-c", WHOLE, str(run), str(tmp / "whole.safetensors"))
        export, export_s = peak("-m", "megacore", "export-hf", str(run), str(tmp / "hf"))
        consolidate, consolidate_s = peak("-m", "megacore", "checkpoints", "consolidate", str(run), str(tmp / "one"))
        same = (tmp / "hf" / "model.safetensors").read_bytes() == (tmp / "whole.safetensors").read_bytes()
        print(f"bare process (torch + megacore imported): {bare / 2**20:.0f} MiB")
        rows = [("whole-model export (today's, reference)", whole, whole_s),
                ("export-hf, streamed", export, export_s), ("checkpoints consolidate, streamed", consolidate, consolidate_s)]
        for what, b, s in rows:
            print(f"{what:42s} peak {b / 2**20:7.0f} MiB, above bare {(b - bare) / 2**20:6.0f} MiB "
                  f"= {(b - bare) / weights:5.2f} x fp32 weights, {s:5.1f} s")
        print(f"streamed export / whole-model export, above bare: {(export - bare) / (whole - bare):.3f}")
        print(f"streamed export byte-identical to the whole-model export: {same}")
        record(f"export-hf peak above a bare process, {n / 1e6:.0f}M params from {args.ranks} FSDP ranks",
               f"{(export - bare) / 2**20:.0f} MiB ({(export - bare) / weights:.2f} x weights)",
               f"whole-model export {(whole - bare) / 2**20:.0f} MiB", f"{(export - bare) / (whole - bare):.3f}",
               "< 0.25 x fp32 weights")
        record(f"consolidate peak above a bare process, {n / 1e6:.0f}M params",
               f"{(consolidate - bare) / 2**20:.0f} MiB ({(consolidate - bare) / weights:.2f} x weights)",
               f"whole-model export {(whole - bare) / 2**20:.0f} MiB", f"{(consolidate - bare) / (whole - bare):.3f}",
               "< 0.25 x fp32 weights")
        assert same, "the streamed export differs from the whole-model export"


if __name__ == "__main__":
    main()
