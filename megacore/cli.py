"""The `megacore` command line.

    megacore data prepare CONFIG [key=value ...]
    megacore data inspect|verify DIR
    megacore data order DIR --dp-size W --dp-rank R --global-batch B --steps N [--start-step S] [--json]
    megacore train CONFIG [key=value ...] [--nproc N] [--max-restarts N] [--resume none|auto|CKPT]
    megacore checkpoints list|verify RUN_DIR
    megacore checkpoints consolidate RUN_DIR|CKPT OUT
    megacore export-hf RUN_DIR|CKPT OUT
    megacore estimate CONFIG [key=value ...] [--world-size N] [--json]
    megacore eval RUN_DIR|CKPT [--split val | --data-dir DIR | --text FILE ...] [--batches N]
    megacore generate RUN_DIR|CKPT [--prompt TEXT] [--chat] [--max-new-tokens N] [--temperature T] [--top-k K]
                     [--top-p P] [--stop TEXT] [--no-cache]
    megacore plot RUN_DIR [--out FILE]
    megacore launch render|submit|status|cancel|logs|local JOB.yaml

Configuration errors, missing files and bad arguments exit with status 2 and a message naming the key
or path, before any training process is started.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

from megacore.config import CheckpointError, ConfigError, load_config
from megacore.data_commands import DataError

USAGE_ERROR = 2


def _fail(message: str) -> int:
    print(f"megacore: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megacore", description="Distributed training for Llama-style models.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare tokenized data").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="raw text -> tokenizer + Arrow token shards + manifest")
    _add_config_args(prep)
    inspect = data.add_parser("inspect", help="statistics of a prepared directory and a decoded sample")
    inspect.add_argument("dir")
    inspect.add_argument("--split", default="train")
    inspect.add_argument("--chars", type=int, default=400, help="characters of decoded sample to show")
    verify = data.add_parser("verify", help="check every shard against the manifest's sha256 and counts")
    verify.add_argument("dir")
    order = data.add_parser("order", help="print the global sample ids one data-parallel rank receives per step")
    order.add_argument("dir")
    order.add_argument("--dp-size", type=int, required=True)
    order.add_argument("--dp-rank", type=int, required=True)
    order.add_argument("--global-batch", type=int, required=True)
    order.add_argument("--steps", type=int, required=True)
    order.add_argument("--start-step", type=int, default=0)
    order.add_argument("--seq-len", type=int, default=256)
    order.add_argument("--seed", type=int, default=1234, help="train.seed of the run")
    order.add_argument("--split", default="train")
    order.add_argument("--json", action="store_true", help="one JSON object per step")

    train = sub.add_parser("train", help="train (or resume) a model")
    _add_config_args(train)
    train.add_argument("--nproc", type=int, default=None,
                       help="start N local ranks under torchrun (omit when already launched by torchrun)")
    train.add_argument("--resume", default="none",
                       help="'none' (refuse if the run has checkpoints), 'auto' (newest checkpoint if any), "
                            "or a checkpoint directory")
    train.add_argument("--max-restarts", type=int, default=0,
                       help="with --nproc: restart the ranks up to N times after a failure, resuming each time")
    train.add_argument("--dry-run", action="store_true", help="validate the config and print it; train nothing")

    est = sub.add_parser("estimate", help="parameters, FLOPs per token and per-rank memory of a layout")
    _add_config_args(est)
    est.add_argument("--world-size", type=int, default=1)
    est.add_argument("--json", action="store_true")

    ck = sub.add_parser("checkpoints", help="list or verify a run's checkpoints, or consolidate one")
    ck.add_argument("action", choices=["list", "verify", "consolidate"])
    ck.add_argument("run_dir", help="run directory (consolidate: or a checkpoint directory)")
    ck.add_argument("out", nargs="?", help="consolidate: the new run directory to write")

    hf = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face LlamaForCausalLM directory")
    hf.add_argument("checkpoint", help="run directory (newest checkpoint) or checkpoint directory")
    hf.add_argument("out")

    ev = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint on a data split")
    ev.add_argument("checkpoint", help="run directory (newest checkpoint) or checkpoint directory")
    ev.add_argument("--split", default="val")
    ev.add_argument("--text", nargs="+", default=None, metavar="FILE",
                    help="raw text files or URLs instead of a prepared split (tokenized with the run's tokenizer)")
    ev.add_argument("--data-dir", default=None, help="prepared data (default: the run's data.dir)")
    ev.add_argument("--batches", type=int, default=0, help="evaluate at most N batches (0: the whole split)")
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per batch")

    gen = sub.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("checkpoint", help="run directory (newest checkpoint) or checkpoint directory")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true", help="PROMPT is a user message; print the assistant's reply")
    gen.add_argument("--stop", action="append", default=[], help="stop at this token, e.g. '<|end|>' (repeatable)")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole context per token (no KV cache)")

    launch = sub.add_parser("launch", help="Slurm jobs (render, submit, status, cancel, logs) or torchrun here (local)")
    launch.add_argument("action", choices=["render", "submit", "status", "cancel", "logs", "local"])
    launch.add_argument("job", help="job spec YAML (names a profile in slurm/clusters/)")
    launch.add_argument("--lines", type=int, default=40, help="logs: lines to show")

    plot = sub.add_parser("plot", help="PNG charts of a run's metrics")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Overrides may follow options (`train cfg.yaml --nproc 2 optim.lr=1e-3`): collect them here.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides += extra
    try:
        if args.command == "data":
            from megacore import data_commands

            return getattr(data_commands, args.data_command)(args)
        if args.command == "train":
            return cmd_train(args, argv)
        if args.command == "checkpoints":
            return cmd_checkpoints(args)
        if args.command == "export-hf":
            from megacore.generate import load_trained
            from megacore.hf import export_hf

            model, tokenizer, _, ckpt = load_trained(args.checkpoint)
            print(f"exported {ckpt} to {export_hf(model, tokenizer, args.out)}")
            return 0
        if args.command == "estimate":
            return cmd_estimate(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "plot":
            return cmd_plot(args)
        if args.command == "launch":
            return cmd_launch(args)
    except ConfigError as e:
        return _fail(str(e))
    except (FileNotFoundError, FileExistsError) as e:
        return _fail(str(e))
    except (DataError, CheckpointError) as e:
        return _fail(str(e))
    return USAGE_ERROR


def cmd_train(args, argv: list[str]) -> int:
    cfg = load_config(args.config, args.overrides)
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if under_torchrun else (args.nproc or 1)
    if args.nproc is not None and args.nproc < 1:
        return _fail(f"--nproc must be >= 1, got {args.nproc}")
    if not under_torchrun:
        # Refuse bad layouts, missing data and run-directory conflicts before starting any process.
        from megacore.run_dir import resolve_vocab_size
        from megacore.train.trainer import refuse_lost_work

        cfg.check_world(world_size)
        resolve_vocab_size(cfg)
        refuse_lost_work(cfg, args.resume, world_size)
    if args.dry_run:
        from megacore.estimate import estimate, format_estimate

        print(json.dumps(cfg.to_dict(), indent=2))
        print(format_estimate(estimate(cfg, world_size)))
        print(f"world size {world_size}: layout ok")
        return 0
    if args.nproc and not under_torchrun:
        from launcher.torchrun import run_local

        return run_local(args.nproc, _without_launch_args(argv), args.max_restarts)
    from megacore.train.trainer import train

    train(cfg, args.resume)
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


def cmd_checkpoints(args) -> int:
    from megacore.checkpoint import consolidate, list_checkpoints, read_meta, verify_checkpoint

    if args.action == "consolidate":
        if not args.out:
            return _fail("checkpoints consolidate needs OUT, the new run directory to write")
        print(f"consolidated weights in {consolidate(args.run_dir, args.out)}")
        return 0
    found = list_checkpoints(args.run_dir)
    if not found:
        raise FileNotFoundError(f"no committed checkpoints in {args.run_dir}")
    bad = 0
    for path in found:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        status = "unchecked"
        if args.action == "verify":
            try:
                verify_checkpoint(path)
                status = "ok"
            except CheckpointError as e:
                status, bad = f"CORRUPT: {e}", bad + 1
        meta = read_meta(path)
        print(f"{path.name}  step {meta['step']:>8}  world {meta.get('world_size', '?'):>3}  "
              f"{size / 2**20:9.1f} MiB  {status}")
    if bad:
        return _fail(f"{bad} corrupt checkpoint(s) in {args.run_dir}")
    return 0


def cmd_estimate(args) -> int:
    from megacore.estimate import estimate, format_estimate
    from megacore.run_dir import resolve_vocab_size

    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size == 0:
        try:
            resolve_vocab_size(cfg)
        except FileNotFoundError:
            cfg.model.vocab_size = cfg.data.vocab_size  # not prepared yet: the configured target
    result = estimate(cfg, args.world_size)
    print(json.dumps(result) if args.json else format_estimate(result))
    return 0


def cmd_eval(args) -> int:
    from data_pipeline.loader import TokenStore
    from megacore.generate import load_trained

    model, tokenizer, cfg, ckpt = load_trained(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        if args.text:
            # Raw text: tokenized here with the run's tokenizer, the whole of it as one split.
            from data_pipeline.prepare import prepare

            prepare(dataclasses.replace(cfg.data, dir=tmp, sources=args.text, format="text", val_fraction=0.0,
                                        tokenizer_from=str(tokenizer.path)), log=lambda *_: None)
            store, split = TokenStore(tmp, "train"), ",".join(args.text)
        else:
            store, split = TokenStore(args.data_dir or cfg.data.dir, args.split), args.split
        result = _evaluate_store(model, cfg, store, args.batch_size, args.batches)
    print(json.dumps({"checkpoint": str(ckpt), "split": split, **result}))
    return 0


def _evaluate_store(model, cfg, store, batch_size: int, batches: int) -> dict:
    import torch

    from data_pipeline.loader import PackedLoader
    from megacore.config import ParallelConfig
    from megacore.distributed import init_distributed, shutdown
    from megacore.evaluate import evaluate
    from megacore.parallel import ParallelModel, build_mesh

    loader = PackedLoader(store, cfg.data.seq_len, batch_size, shuffle=False)
    env = init_distributed("cpu")
    try:
        layout = ParallelConfig(dp_shard=1).resolve(1)
        pm = ParallelModel([model], build_mesh(layout, env), layout, document_masking=cfg.model.document_masking)
        n_micro = max(1, batch_size // cfg.train.micro_batch_size)
        return evaluate(pm, loader, batches or loader.batches_per_epoch, n_micro, torch.device("cpu"))
    finally:
        shutdown()


def cmd_generate(args) -> int:
    import torch

    from data_pipeline import chat
    from megacore.generate import load_trained, sample

    model, tokenizer, _, _ = load_trained(args.checkpoint)
    generator = torch.Generator().manual_seed(args.seed)
    if args.chat:
        # One user turn in the chat template; the reply ends at <|end|> (or EOS).
        prompt_ids = chat.prompt(tokenizer.sp, [{"role": "user", "content": args.prompt}])
        stop = {chat.special_id(tokenizer.sp, chat.END), tokenizer.eos_id}
    else:
        # Training documents are separated by EOS, so an empty prompt starts "at a document boundary".
        prompt_ids = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eos_id]
        stop = {tokenizer.sp.piece_to_id(piece) for piece in args.stop}
        if tokenizer.sp.unk_id() in stop:
            return _fail(f"--stop {args.stop}: each must be one token of this tokenizer, e.g. '<|end|>'")
    new = sample(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                 stop_ids=stop, generator=generator, use_cache=not args.no_cache)
    if new and new[-1] in stop:
        new = new[:-1]
    print(tokenizer.decode(new) if args.chat else args.prompt + tokenizer.decode(new))
    return 0


def cmd_launch(args) -> int:
    from launcher import slurm
    from launcher.render import render_sbatch, run_dir_of
    from launcher.spec import load_job
    from launcher.torchrun import run_local

    job, profile = load_job(args.job)
    profile_file = job.cluster
    try:
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
    except slurm.SlurmError as e:
        return _fail(str(e))
    return 0


def cmd_plot(args) -> int:
    from megacore.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
