"""Checkpoint throughput, the training stall of async save, and the commit time on 1, 2 and 4 ranks.

Reference, in the same script and on the same disk: a plain sequential write (with fsync) and read of
as many bytes as the checkpoint holds. Measured: `Checkpointer.save` (DCP files, per-rank RNG, meta,
sha256 manifest, atomic rename) and `Checkpointer.load`, on one process with a ~70M-parameter model
and its AdamW state. Async: the time `save` blocks the training loop (staging the state in memory)
as a share of one training step.

Object storage: the same save, load and async stall with checkpoint.dir in a bucket of a real S3 API
(moto's server, started here on loopback, through s3fs), next to the same on local disk (the
reference), in one process. Loopback only: it measures our upload path and protocol, not a network.

Commit on 1, 2 and 4 ranks (real torchrun processes, FSDP over all of them, the same model): the time
from every rank's files written to the checkpoint committed. Reference: what earlier versions did at
commit, rank 0 alone hashing every byte of the same checkpoint, measured on the same files.

    python bench/checkpoint.py [--dim 768] [--layers 6] [--ranks 1,2,4] [--skip-s3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from report import record

from megacore.checkpoint.dcp import Checkpointer
from megacore.checkpoint.meta import CheckpointMeta
from megacore.config import CheckpointConfig, ModelConfig, OptimConfig
from megacore.distributed import init_distributed, shutdown
from megacore.loss import loss_sum
from megacore.model import Llama
from megacore.train.optim import Optimizers

REPO = Path(__file__).resolve().parent.parent


def training(args):
    """The benchmark's model, its AdamW optimizers, and a function that runs one training step (seconds)."""
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=12, n_kv_heads=4, vocab_size=16384,
                      max_seq_len=args.seq)
    model = Llama(cfg)
    optimizers = Optimizers([model], OptimConfig())
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))

    def step() -> float:
        start = time.perf_counter()
        loss_sum(model(tokens[:, :-1]), tokens[:, 1:]).div(tokens[:, 1:].numel()).backward()
        optimizers.step()
        optimizers.zero_grad()
        return time.perf_counter() - start

    return model, optimizers, step


def plain_write_read(path: Path, nbytes: int) -> tuple[float, float]:
    data = np.random.default_rng(0).integers(0, 255, size=nbytes, dtype=np.uint8)
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - start
    start = time.perf_counter()
    with open(path, "rb") as f:
        f.read()
    return write, time.perf_counter() - start


def commit_worker(args) -> None:
    """Under torchrun: FSDP over every rank, one step, one save; rank 0 writes the timings to args.out."""
    from megacore.checkpoint.meta import CheckpointMeta
    from megacore.checkpoint.store import hash_files
    from megacore.config import load_config
    from megacore.loss import LanguageModelLoss
    from megacore.parallel.layout import Layout
    from megacore.parallel.parallelize import parallelize
    from megacore.train.torch_module import TorchTrainModule

    env = init_distributed("cpu")
    try:
        cfg = load_config(REPO / "configs/tiny.yaml", [
            f"model.dim={args.dim}", f"model.n_layers={args.layers}", "model.n_heads=12", "model.n_kv_heads=4",
            "model.vocab_size=16384", f"data.seq_len={args.seq}", "train.micro_batch_size=1",
            f"train.global_batch_size={env.world_size}"])
        layout = Layout.resolve(cfg, env.world_size)
        with torch.device("meta"):
            model = Llama(cfg.model)
        loss = LanguageModelLoss.for_run(layout.tp, compiled=False)
        par = parallelize(model, cfg, layout, layout.build_mesh("cpu"), env.device, loss)
        optimizers = Optimizers(par.parts, cfg.optim)
        module = TorchTrainModule(par.stages, layout, env.rank, env.device, loss, optimizers)
        tokens = torch.randint(0, cfg.model.vocab_size, (1, args.seq + 1))
        module.train_batch({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}, 1.0 / args.seq)
        module.optim_step(cfg.optim.lr)  # creates the AdamW state
        ckpt = Checkpointer(Path(args.out).parent / "run", CheckpointConfig(keep_last=0), env.rank)
        start = time.perf_counter()
        path = ckpt.save(1, par.parts, optimizers, CheckpointMeta(step=1, world_size=env.world_size))
        save_s = time.perf_counter() - start
        if env.rank == 0:
            files = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file())
            start = time.perf_counter()
            hash_files(path, files, threads=1)  # what rank 0 alone did at every commit before
            rank0_hash_s = time.perf_counter() - start
            Path(args.out).write_text(json.dumps({
                "ranks": env.world_size, "bytes": sum((path / f).stat().st_size for f in files),
                "commit_s": ckpt.last_commit_seconds, "save_s": save_s, "rank0_hash_s": rank0_hash_s}))
    finally:
        shutdown()


def commit_scaling(args) -> None:
    print(f"\n{'ranks':>5} {'GB':>6} {'save s':>8} {'commit s':>9} {'rank-0 hashing s':>17} {'ratio':>7}")
    for n in [int(x) for x in args.ranks.split(",")]:
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-commit-{n}-"))
        try:
            out = workdir / "result.json"
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                            __file__, "--commit-worker", str(out), "--dim", str(args.dim), "--layers",
                            str(args.layers), "--seq", str(args.seq)], check=True, env=env)
            r = json.loads(out.read_text())
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        ratio = r["rank0_hash_s"] / r["commit_s"]
        print(f"{n:>5} {r['bytes'] / 1e9:>6.2f} {r['save_s']:>8.2f} {r['commit_s']:>9.3f} {r['rank0_hash_s']:>17.3f} "
              f"{ratio:>6.1f}x")
        record(f"checkpoint commit, {r['bytes'] / 1e9:.2f} GB, {n} rank(s) (FSDP)", f"{r['commit_s']:.3f} s",
               f"rank 0 hashing every byte (before): {r['rank0_hash_s']:.3f} s", f"{ratio:.1f}x",
               ">= 2x at 4 ranks" if n == 4 else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--skip-s3", action="store_true", help="leave out the object-storage comparison")
    parser.add_argument("--commit-worker", dest="out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out:
        return commit_worker(args)
    single_process(args)
    if not args.skip_s3:
        object_storage(args)
    commit_scaling(args)


def start_moto() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("moto server did not start")


def object_storage(args) -> None:
    """Save (with commit), load and async stall: checkpoint.dir in a moto bucket vs local disk."""
    server, endpoint = start_moto()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    import fsspec

    fsspec.filesystem("s3").mkdir("bench")
    init_distributed("cpu")
    workdir = Path(tempfile.mkdtemp(prefix="bench-ckpt-s3-"))
    try:
        model, optimizers, step = training(args)
        step()
        results = {}
        for where, ck_dir in (("local", ""), ("s3", "s3://bench/checkpoints")):
            ckpt = Checkpointer(workdir / where, CheckpointConfig(keep_last=1, dir=ck_dir), rank=0)
            start = time.perf_counter()
            path = ckpt.save(1, [model], optimizers, CheckpointMeta(step=1, world_size=1))
            save_s = time.perf_counter() - start
            if where == "local":
                nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            start = time.perf_counter()
            ckpt.load(path, [model], optimizers)
            load_s = time.perf_counter() - start
            async_ckpt = Checkpointer(workdir / where, CheckpointConfig(keep_last=1, dir=ck_dir, async_save=True), 0)
            stalls, steps = [], []
            for i in range(3):
                start = time.perf_counter()
                async_ckpt.save(2 + i, [model], optimizers, CheckpointMeta(step=2 + i, world_size=1))
                stalls.append(time.perf_counter() - start)
                while async_ckpt.poll() is None:  # training goes on while the files are written and uploaded
                    steps.append(step())
            async_ckpt.close()
            results[where] = (save_s, load_s, statistics.median(stalls[1:]))
        # The store's own speed (moto is a Python server): one plain upload and download of as many bytes.
        fs, payload = fsspec.filesystem("s3"), np.random.default_rng(0).bytes(nbytes)
        start = time.perf_counter()
        fs.pipe("bench/plain.bin", payload)
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        fs.cat("bench/plain.bin")
        get_s = time.perf_counter() - start
        gb = nbytes / 1e9
        (ls, ll, lstall), (ss, sl, sstall) = results["local"], results["s3"]
        print(f"\nobject storage (moto on loopback), {gb:.2f} GB checkpoint, 1 process")
        print(f"{'':<22} {'s3':>8} {'local':>8} {'s3/local':>9} {'plain s3':>9} {'s3/plain':>9}")
        print(f"{'save with commit (s)':<22} {ss:>8.3f} {ls:>8.3f} {ss / ls:>8.2f}x {put_s:>9.3f} {ss / put_s:>8.2f}x")
        print(f"{'load (s)':<22} {sl:>8.3f} {ll:>8.3f} {sl / ll:>8.2f}x {get_s:>9.3f} {sl / get_s:>8.2f}x")
        print(f"{'async stall (s)':<22} {sstall:>8.3f} {lstall:>8.3f} {sstall / lstall:>8.2f}x")
        what = f"checkpoint in object storage (moto S3 on loopback), {gb:.2f} GB, 1 process"
        record(what + ": save with commit", f"{gb / ss:.3f} GB/s",
               f"local disk: {gb / ls:.3f} GB/s; one plain upload to the same store: {gb / put_s:.3f} GB/s",
               f"{ls / ss:.2f}x of local, {put_s / ss:.2f}x of plain", "")
        record(what + ": load", f"{gb / sl:.3f} GB/s",
               f"local disk: {gb / ll:.3f} GB/s; one plain download: {gb / get_s:.3f} GB/s",
               f"{ll / sl:.2f}x of local, {get_s / sl:.2f}x of plain", "")
        record(what + ": async save stall", f"{sstall:.3f} s", f"local disk: {lstall:.3f} s", f"{sstall / lstall:.2f}x",
               "no more than local (<= ~1.2x)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutdown()
        server.terminate()


def single_process(args) -> None:
    init_distributed("cpu")
    workdir = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    try:
        model, optimizers, step = training(args)
        step()  # creates the optimizer state
        sync = Checkpointer(workdir / "sync", CheckpointConfig(keep_last=0), rank=0)
        start = time.perf_counter()
        path = sync.save(1, [model], optimizers, CheckpointMeta(step=1, world_size=1))
        save_s = time.perf_counter() - start
        nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        start = time.perf_counter()
        sync.load(path, [model], optimizers)
        load_s = time.perf_counter() - start
        write_s, read_s = plain_write_read(workdir / "plain.bin", nbytes)

        steps = [step() for _ in range(3)]
        async_ckpt = Checkpointer(workdir / "async", CheckpointConfig(keep_last=0, async_save=True), rank=0)
        stalls = []
        for i in range(3):  # the first save allocates the staging buffers; later ones reuse them
            start = time.perf_counter()
            async_ckpt.save(2 + i, [model], optimizers, CheckpointMeta(step=2 + i, world_size=1))
            stalls.append(time.perf_counter() - start)
            while async_ckpt.poll() is None:  # training goes on while the files are written
                steps.append(step())
        async_ckpt.close()
        step_s = statistics.median(steps)

        gb = nbytes / 1e9
        print(f"checkpoint: {gb:.2f} GB ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters + AdamW)")
        print(f"{'':<22} {'GB/s':>8} {'plain GB/s':>11} {'ratio':>7}")
        print(f"{'save (sync, commit)':<22} {gb / save_s:>8.3f} {gb / write_s:>11.3f} {write_s / save_s:>6.2f}x")
        print(f"{'load':<22} {gb / load_s:>8.3f} {gb / read_s:>11.3f} {read_s / load_s:>6.2f}x")
        for i, stall in enumerate(stalls):
            print(f"async save {i + 1}: blocks training {stall:.3f} s = {stall / step_s:.1%} of a {step_s:.2f} s step"
                  + (" (staging buffers allocated)" if i == 0 else " (staging buffers reused)"))
        what = f"checkpoint, {gb:.2f} GB, 1 process"
        record(what + ": save with commit", f"{gb / save_s:.3f} GB/s", f"plain write + fsync: {gb / write_s:.3f} GB/s",
               f"{write_s / save_s:.2f}x", ">= 0.7x")
        record(what + ": load", f"{gb / load_s:.3f} GB/s", f"plain read: {gb / read_s:.3f} GB/s",
               f"{read_s / load_s:.2f}x", ">= 0.7x")
        record(what + ": async save stall (reused buffers)", f"{statistics.median(stalls[1:]):.3f} s",
               f"median step {step_s:.2f} s", f"{statistics.median(stalls[1:]) / step_s:.1%} of a step", "< 5%")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutdown()


if __name__ == "__main__":
    main()
