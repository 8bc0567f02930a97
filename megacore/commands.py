"""The handlers of the `megacore` subcommands, one function each (the parser is megacore/cli.py).

Each takes the parsed arguments and returns the exit status. Errors a user can act on are raised as
megacore.errors types (or FileNotFoundError / FileExistsError) and become exit 2 in the CLI. Imports are
local so that `megacore --help` and the quick commands do not load torch's distributed stack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megacore.config import load_config
from megacore.errors import CheckpointError, DataError, UsageError

# -- data --

def data_prepare(args) -> int:
    from data_pipeline.prepare import prepare
    from data_pipeline.storage import check_access

    data = load_config(args.config, args.overrides).data
    check_access(data.dir, "data.dir", write=True)
    prepare(data)
    return 0


def data_inspect(args) -> int:
    import numpy as np

    from data_pipeline.shards import read_manifest, read_shard
    from data_pipeline.tokenizer import load_tokenizer

    _local_data_dir(args.dir, "inspect")
    manifest = read_manifest(args.dir)
    print(f"{args.dir}: fingerprint {manifest['fingerprint']}, tokenizer vocab {manifest['tokenizer']['vocab_size']} "
          f"({manifest['tokenizer']['sha256'][:12]}), dtype {manifest['dtype']}")
    for split, info in manifest["splits"].items():
        print(f"  {split}: {info['documents']:,} documents, {info['tokens']:,} tokens, {len(info['shards'])} shard(s), "
              f"{info['bytes'] / info['tokens']:.2f} bytes/token, "
              f"{info['tokens'] / info['documents']:.1f} tokens/document")
    print("  stats: " + ", ".join(f"{k} {v:,}" for k, v in manifest["stats"].items()))
    if args.split not in manifest["splits"]:
        raise DataError(f"{args.dir}: no split {args.split!r} (have: {', '.join(manifest['splits'])})")
    values, offsets = read_shard(Path(args.dir) / manifest["splits"][args.split]["shards"][0]["file"])
    tokenizer = load_tokenizer(args.dir)
    lengths = np.diff(offsets)
    print(f"  {args.split} document length (tokens): min {lengths.min()}, median {int(np.median(lengths))}, "
          f"max {lengths.max()}")
    sample = tokenizer.decode(values[offsets[0]:offsets[min(len(offsets) - 1, 20)]].tolist())
    print(f"--- first documents of {args.split}, decoded ---\n{sample[:args.chars]}")
    return 0


def _local_data_dir(directory: str, command: str) -> None:
    from data_pipeline.storage import is_url

    if is_url(directory):
        raise UsageError(f"`megacore data {command}` reads a local directory, not {directory}; training reads and "
                         f"verifies shards from object storage itself (each as it downloads), and "
                         f"`megacore data order` works on URLs")


def data_verify(args) -> int:
    from data_pipeline.errors import ShardError
    from data_pipeline.shards import file_sha256, read_manifest, read_shard

    _local_data_dir(args.dir, "verify")
    manifest = read_manifest(args.dir)
    problems = _tokenizer_problems(Path(args.dir), manifest["tokenizer"])
    shards = [(Path(args.dir) / s["file"], s["sha256"], s["tokens"])
              for info in manifest["splits"].values() for s in info["shards"]]
    for path, sha, tokens in shards:
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif file_sha256(path) != sha:
            problems.append(f"{path}: sha256 mismatch (file altered or truncated)")
        else:
            try:
                if len(read_shard(path)[0]) != tokens:
                    problems.append(f"{path}: token count differs from the manifest")
            except ShardError as e:  # (unreadable: it names the file)
                problems.append(str(e))
    if problems:
        raise DataError("verification failed:\n  " + "\n  ".join(problems))
    print(f"{args.dir}: {len(shards) + len(manifest['tokenizer'].get('files', [None]))} files verified")
    return 0


def _tokenizer_problems(data_dir: Path, record: dict) -> list[str]:
    """The tokenizer's files (a published model's has several: config, chat template) against the one
    sha256 the manifest records for all of them together."""
    from data_pipeline.tokenizer import load_tokenizer

    names = record.get("files", [record["file"]])
    missing = [f"{data_dir / name}: missing" for name in names if not (data_dir / name).is_file()]
    if missing:
        return missing
    if load_tokenizer(data_dir).sha256 != record["sha256"]:
        return [f"{data_dir / record['file']}: sha256 mismatch (tokenizer files {', '.join(names)} altered)"]
    return []


def data_order(args) -> int:
    from data_pipeline.loader import PackedLoader, TokenStore

    for flag, value in (("--dp-size", args.dp_size), ("--global-batch", args.global_batch),
                        ("--seq-len", args.seq_len)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.dp_rank < args.dp_size:
        raise UsageError(f"--dp-rank {args.dp_rank} is not in [0, --dp-size {args.dp_size})")
    if args.global_batch % args.dp_size:
        raise UsageError(f"--global-batch {args.global_batch} is not divisible by --dp-size {args.dp_size}")
    if args.steps < 0 or args.start_step < 0:
        raise UsageError(f"--steps and --start-step must be >= 0, got {args.steps} and {args.start_step}")
    loader = PackedLoader(TokenStore(args.dir, args.split), args.seq_len, args.global_batch, args.dp_rank,
                          args.dp_size, seed=args.seed)
    loader.skip(args.start_step)
    for step in range(args.start_step, args.start_step + args.steps):
        ids = loader.next_batch()["sample_ids"][:, 1].tolist()
        if args.json:
            print(json.dumps({"step": step, "dp_rank": args.dp_rank, "sample_ids": ids}))
        else:
            print(f"step {step}: {' '.join(map(str, ids))}")
    return 0


# -- training --

def train(args) -> int:
    from launcher.torchrun import under_torchrun
    from megacore.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    ranked = under_torchrun()
    if args.nproc is not None and args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if ranked else (args.nproc or 1)
    if args.world_size is not None:
        if not args.dry_run:
            raise UsageError("--world-size plans a job with --dry-run; to train, use --nproc N or torchrun")
        if args.world_size < 1:
            raise UsageError(f"--world-size must be >= 1, got {args.world_size}")
        return _plan(preflight(cfg, args.world_size, overrides=args.overrides, data=False).cfg, args.world_size)
    if not ranked:
        # Refuse bad settings, layouts, missing data and run-directory conflicts before starting any
        # process (each rank's train() resolves the same config again, with its device).
        from megacore.checkpoint.resume import refuse_lost_work, run_checkpoints
        from megacore.checkpoint.store import latest_checkpoint
        from megacore.preflight import check_storage

        check_storage(cfg, args.resume)
        cfg = preflight(cfg, world_size, overrides=args.overrides).cfg
        refuse_lost_work(cfg, args.resume, world_size)
        if cfg.train.init_from and (args.resume == "none" or latest_checkpoint(run_checkpoints(cfg)) is None):
            from megacore.checkpoint.weights import check_init_from

            check_init_from(cfg)
    if args.dry_run:
        from megacore.parallel.estimate import estimate, format_estimate

        print(json.dumps(cfg.to_dict(), indent=2))
        print(format_estimate(estimate(cfg, world_size)))
        print(f"world size {world_size}: layout ok")
        return 0
    if args.nproc and not ranked:
        from launcher.torchrun import run_local

        return run_local(args.nproc, _without_launch_args(args.argv), args.max_restarts)
    from launcher.torchrun import report_health_stop
    from megacore.health.events import EXIT_FATAL
    from megacore.train.trainer import train as run_training

    result = run_training(cfg, args.resume)
    if result.stop_reason != "health":
        return 0
    # A fatal health stop (already reported): status 3, but a rank under torchrun exits 0, or torchrun
    # would restart it; the launcher (or the batch script, from RUN_DIR/health/STOPPED) gives the 3.
    if ranked:
        report_health_stop()
        return 0
    return EXIT_FATAL


def _plan(cfg, world_size: int) -> int:
    """train --dry-run --world-size N: the real model and parallel plan on the meta device for N ranks, in
    this process; the data and run directory are not needed (nor checked)."""
    from megacore.parallel.estimate import estimate, format_estimate

    print(format_estimate(estimate(cfg, world_size)))
    print(f"world size {world_size}: layout ok (planned on the meta device; data and run directory not checked)")
    return 0


def _without_launch_args(argv: list[str]) -> list[str]:
    """The command line each rank runs: without the options that only the launcher reads."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--nproc", "--max-restarts"):
            skip = True
        elif not a.startswith(("--nproc=", "--max-restarts=")):
            out.append(a)
    return out


def estimate(args) -> int:
    from megacore.parallel.estimate import estimate as estimate_layout
    from megacore.parallel.estimate import format_estimate
    from megacore.preflight import preflight

    cfg = preflight(load_config(args.config, args.overrides), args.world_size, overrides=args.overrides, data=False).cfg
    result = estimate_layout(cfg, args.world_size)
    print(json.dumps(result) if args.json else format_estimate(result))
    return 0


# -- checkpoints --

def checkpoints(args) -> int:
    from megacore.checkpoint.meta import read_meta
    from megacore.checkpoint.store import file_sizes, list_checkpoints, verify_checkpoint
    from megacore.checkpoint.weights import consolidate

    if args.action == "consolidate":
        if not args.out:
            raise UsageError("checkpoints consolidate needs OUT, the new run directory to write")
        _streaming_process()
        print(f"consolidated weights in {consolidate(args.run_dir, args.out, _dtype(args.dtype))}")
        return 0
    found = list_checkpoints(args.run_dir)
    if not found:
        raise FileNotFoundError(f"no committed checkpoints in {args.run_dir}")
    bad = 0
    for path in found:
        size = sum(file_sizes(path).values())
        status = "unchecked"
        if args.action == "verify":
            try:
                verify_checkpoint(path)
                status = "ok"
            except CheckpointError as e:
                status, bad = f"CORRUPT: {e}", bad + 1
        meta = read_meta(path)
        print(f"{path.name}  step {meta.step:>8}  world {meta.world_size or '?':>3}  "
              f"{size / 2**20:9.1f} MiB  {status}")
    if bad:
        raise CheckpointError(f"{bad} corrupt checkpoint(s) in {args.run_dir}")
    return 0


def export_hf(args) -> int:
    from data_pipeline.storage import check_access
    from megacore.checkpoint.hf import export_hf as export
    from megacore.checkpoint.weights import open_trained

    check_access(args.checkpoint, "CHECKPOINT")
    check_access(args.out, "OUT", write=True)
    _streaming_process()
    trained = open_trained(args.checkpoint)
    out = export(trained.weights, trained.config.model, trained.tokenizer, args.out, dtype=_dtype(args.dtype))
    print(f"exported {trained.source} to {out}")
    return 0


def _streaming_process() -> None:
    """A process that reads and writes one tensor after another returns each to the system when freed."""
    from megacore.device import set_mmap_threshold

    set_mmap_threshold(1 << 20)


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


# -- using a trained model --

def evaluate(args) -> int:
    from data_pipeline.storage import check_access
    from megacore.eval.evaluate import evaluate_checkpoint, evaluate_tasks

    check_access(args.checkpoint, "CHECKPOINT")
    if _launch_ranks(args):
        return _run_ranks(args)
    if args.task:
        result = evaluate_tasks(args.checkpoint, args.task, args.batch_size, args.overrides)
    else:
        result = evaluate_checkpoint(args.checkpoint, args.split, args.data_dir, args.text, args.batch_size,
                                     args.batches, args.overrides)
    if result is not None:  # (rank 0 of --nproc N, or the one process)
        print(json.dumps(result, indent=2 if args.task else None))
    return 0


def generate(args) -> int:
    from data_pipeline.storage import check_access
    from megacore.eval.evaluate import trained_module
    from megacore.eval.generate import generate_text
    from megacore.eval.sharded import agreed_token, check_generate_layout

    check_access(args.checkpoint, "CHECKPOINT")
    if _launch_ranks(args, check_generate_layout):
        return _run_ranks(args)
    with trained_module(args.checkpoint, overrides=args.overrides, check=check_generate_layout) as run:
        agree = (lambda token: agreed_token(token, run.env.device)) if run.env.world_size > 1 else None
        text = generate_text(run.module.parts[0], run.tokenizer, args.prompt, chat_turn=args.chat, stop=args.stop,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache, agree=agree)
        if run.env.is_main:
            print(text)
    return 0


def _launch_ranks(args, check=None) -> bool:
    """`eval`/`generate --nproc N` in the launching process: refuse a layout that does not fit N ranks (or
    overrides without --nproc) before any process starts; True when ranks are to be started."""
    from launcher.torchrun import under_torchrun

    if args.overrides and not args.nproc and not under_torchrun():
        raise UsageError(f"{' '.join(args.overrides)}: parallel overrides apply with --nproc N")
    if args.nproc is None or under_torchrun():
        return False
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    from megacore.checkpoint.weights import trained_config
    from megacore.eval.sharded import eval_config

    cfg = eval_config(trained_config(args.checkpoint, verify=False)[0], args.overrides, args.nproc,
                      getattr(args, "batch_size", None))
    if check is not None:
        check(cfg)
    return True


def _run_ranks(args) -> int:
    from launcher.torchrun import run_local

    return run_local(args.nproc, _without_launch_args(args.argv))


def plot(args) -> int:
    from megacore.monitor.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def health(args) -> int:
    from megacore.health.events import history
    from megacore.health.watchdog import request_stacks

    if not Path(args.run_dir).is_dir():
        raise FileNotFoundError(f"not a run directory: {args.run_dir}")
    if args.stacks:
        print(f"asked every live rank for its stacks: they appear in {request_stacks(args.run_dir)} within "
              f"health.heartbeat_s")
        return 0
    print(history(args.run_dir))
    return 0


# -- launching --

def launch(args) -> int:
    from launcher import slurm
    from launcher.render import render_sbatch, run_dir_of
    from launcher.spec import load_job
    from launcher.torchrun import run_local

    job, profile = load_job(args.job)
    profile_file = job.cluster
    if args.action == "render":
        print(render_sbatch(job, profile, args.job, profile_file), end="")
    elif args.action == "submit":
        print(f"submitted job {slurm.submit(job, profile, args.job, profile_file)} ({job.name}); "
              f"run directory {run_dir_of(job)}")
    elif args.action == "status":
        print("\n".join(slurm.status(job)))
    elif args.action == "cancel":
        print(f"cancelled {' '.join(slurm.cancel(job))}")
    elif args.action == "logs":
        print(slurm.logs(job, args.lines))
    else:  # local: torchrun on this machine, each sweep entry in turn
        for extra in job.sweep or [[]]:
            cli = ["train", job.config, *job.overrides, *extra, "--resume", "auto"]
            status = run_local(profile.procs_per_node, cli, job.max_restarts)
            if status:
                return status
    return 0
