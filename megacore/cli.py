"""The `megacore` command line.

    megacore data prepare CONFIG [key=value ...]
    megacore data inspect|verify DIR
    megacore data order DIR --dp-size W --dp-rank R --global-batch B --steps N [--start-step S] [--json]
    megacore train CONFIG [key=value ...] [--nproc N] [--max-restarts N] [--resume none|auto|CKPT]
    megacore train CONFIG [key=value ...] --dry-run [--world-size N]
    megacore checkpoints list|verify RUN_DIR
    megacore checkpoints consolidate RUN_DIR|CKPT OUT
    megacore export-hf RUN_DIR|CKPT OUT
    megacore estimate CONFIG [key=value ...] [--world-size N] [--json]
    megacore eval RUN_DIR|CKPT|HF_DIR [--split val | --data-dir DIR | --text FILE ...] [--batches N]
    megacore generate RUN_DIR|CKPT|HF_DIR [--prompt TEXT] [--chat] [--max-new-tokens N] [--temperature T] [--top-k K]
                     [--top-p P] [--stop TEXT] [--no-cache]
    megacore plot RUN_DIR [--out FILE]
    megacore launch render|submit|status|cancel|logs|local JOB.yaml

Errors a user can act on (megacore/errors.py: bad arguments, config keys, data, checkpoints) and
missing files exit with status 2 and one message naming the argument, key or path, before any training
process is started where they can be found then; any other exception is a bug and prints its traceback
(status 1). This file is the parser; the handlers, one per subcommand, are in megacore/commands.py.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import traceback

from megacore import commands
from megacore.errors import USER_ERRORS

USAGE_ERROR = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megacore", description="Distributed training for Llama-style models.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare tokenized data").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="raw text -> tokenizer + Arrow token shards + manifest")
    _add_config_args(prep)
    prep.set_defaults(handler=commands.data_prepare)
    inspect = data.add_parser("inspect", help="statistics of a prepared directory and a decoded sample")
    inspect.add_argument("dir", help="a prepared data directory (data.dir)")
    inspect.add_argument("--split", default="train", help="the split to sample (train or val)")
    inspect.add_argument("--chars", type=int, default=400, help="characters of decoded sample to show")
    inspect.set_defaults(handler=commands.data_inspect)
    verify = data.add_parser("verify", help="check every shard against the manifest's sha256 and counts")
    verify.add_argument("dir", help="a prepared data directory (data.dir)")
    verify.set_defaults(handler=commands.data_verify)
    order = data.add_parser("order", help="print the global sample ids one data-parallel rank receives per step")
    order.add_argument("dir", help="a prepared data directory (data.dir)")
    order.add_argument("--dp-size", type=int, required=True, help="data-parallel ranks of the run")
    order.add_argument("--dp-rank", type=int, required=True, help="the rank whose samples to print")
    order.add_argument("--global-batch", type=int, required=True, help="train.global_batch_size of the run")
    order.add_argument("--steps", type=int, required=True, help="steps to print")
    order.add_argument("--start-step", type=int, default=0, help="optimizer steps already taken")
    order.add_argument("--seq-len", type=int, default=256, help="data.seq_len of the run")
    order.add_argument("--seed", type=int, default=1234, help="train.seed of the run")
    order.add_argument("--split", default="train", help="the split (train or val)")
    order.add_argument("--json", action="store_true", help="one JSON object per step")
    order.set_defaults(handler=commands.data_order)

    train = sub.add_parser("train", help="train (or resume) a model")
    _add_config_args(train)
    train.add_argument("--nproc", type=int, default=None,
                       help="start N local ranks under torchrun (omit when already launched by torchrun)")
    train.add_argument("--resume", default="none",
                       help="'none' (refuse if the run has checkpoints), 'auto' (newest checkpoint if any), "
                            "or a checkpoint directory")
    train.add_argument("--max-restarts", type=int, default=0,
                       help="with --nproc: restart the ranks up to N times after a failure, resuming each time")
    train.add_argument("--dry-run", action="store_true",
                       help="validate the config, plan the layout and print every rank's bytes; train nothing")
    train.add_argument("--world-size", type=int, default=None,
                       help="with --dry-run: plan for N ranks (a cluster job, on this machine; data not needed)")
    train.set_defaults(handler=commands.train)

    est = sub.add_parser("estimate", help="parameters, FLOPs per token and per-rank memory of a layout")
    _add_config_args(est)
    est.add_argument("--world-size", type=int, default=1, help="ranks to plan for (the layout's degrees must fit)")
    est.add_argument("--json", action="store_true", help="the figures as one JSON object")
    est.set_defaults(handler=commands.estimate)

    ck = sub.add_parser("checkpoints", help="list or verify a run's checkpoints, or consolidate one")
    ck.add_argument("action", choices=["list", "verify", "consolidate"])
    ck.add_argument("run_dir", help="run directory (consolidate: or a checkpoint directory)")
    ck.add_argument("out", nargs="?", help="consolidate: the new run directory to write")
    ck.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="consolidate: the weights' dtype (bf16 halves the files; loads give fp32 again)")
    ck.set_defaults(handler=commands.checkpoints)

    hf = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face directory of its model.family "
                                           "(Llama, Mistral, Qwen2, Qwen3): safetensors, config.json, tokenizer")
    hf.add_argument("checkpoint", help="run directory (newest checkpoint) or checkpoint directory (either backend)")
    hf.add_argument("out", help="the Hugging Face directory to write")
    hf.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="the weights' dtype (fp32, the default, reproduces the run's logits exactly)")
    hf.set_defaults(handler=commands.export_hf)

    ev = sub.add_parser("eval", help="loss, perplexity, bits per byte and accuracy of a model on a data split")
    ev.add_argument("checkpoint", help="run directory (newest checkpoint), checkpoint directory, or a published "
                                       "Hugging Face model directory (its config.json, safetensors and tokenizer)")
    ev.add_argument("--split", default="val", help="the prepared split to evaluate on")
    ev.add_argument("--text", nargs="+", default=None, metavar="FILE",
                    help="raw text files or URLs instead of a prepared split (tokenized with the run's tokenizer)")
    ev.add_argument("--data-dir", default=None, help="prepared data (default: the run's data.dir)")
    ev.add_argument("--batches", type=int, default=0, help="evaluate at most N batches (0: the whole split)")
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    ev.add_argument("--task", action="append", default=None, metavar="NAME=FILE",
                    help="a downstream task from a JSON-lines file (repeatable), scored as lm-evaluation-harness "
                         "scores it: multiple choice (context, choices, label) or a target (context, target); "
                         "results printed as JSON and saved in RUN_DIR/evals/")
    _add_nproc_arg(ev)
    ev.set_defaults(handler=commands.evaluate)

    gen = sub.add_parser("generate", help="sample text from a model")
    gen.add_argument("checkpoint", help="run directory (newest checkpoint), checkpoint directory, or a published "
                                        "Hugging Face model directory")
    gen.add_argument("--prompt", default="", help="the text to continue (with --chat: the user's message)")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample at most")
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=0.95, help="sample within this probability mass (1: all)")
    gen.add_argument("--seed", type=int, default=0, help="the sampling seed")
    gen.add_argument("--chat", action="store_true", help="PROMPT is a user message; print the assistant's reply")
    gen.add_argument("--stop", action="append", default=[], help="stop at this token, e.g. '<|end|>' (repeatable)")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole context per token (no KV cache)")
    _add_nproc_arg(gen)
    gen.set_defaults(handler=commands.generate)

    launch = sub.add_parser("launch", help="Slurm jobs (render, submit, status, cancel, logs) or torchrun here (local)")
    launch.add_argument("action", choices=["render", "submit", "status", "cancel", "logs", "local"])
    launch.add_argument("job", help="job spec YAML (names a profile in slurm/clusters/)")
    launch.add_argument("--lines", type=int, default=40, help="logs: lines to show")
    launch.set_defaults(handler=commands.launch)

    plot = sub.add_parser("plot", help="PNG charts of a run's metrics")
    plot.add_argument("run_dir", help="a run directory (its metrics.jsonl)")
    plot.add_argument("--out", default=None, help="the PNG to write (default: RUN_DIR/loss.png)")
    plot.set_defaults(handler=commands.plot)

    health = sub.add_parser("health", help="a run's health history: restarts, hangs and who hung, skipped steps, "
                                           "rollbacks, stragglers")
    health.add_argument("run_dir", help="a run directory")
    health.add_argument("--stacks", action="store_true",
                        help="ask every live rank of the run to write its Python stacks to RUN_DIR/health/stacks/ "
                             "(within a heartbeat; training goes on)")
    health.set_defaults(handler=commands.health)
    return parser


def _add_nproc_arg(parser) -> None:
    parser.add_argument("--nproc", type=int, default=None,
                        help="run on N local ranks under torchrun, the model sharded by the run's parallel "
                             "settings or by parallel.KEY=VALUE overrides (e.g. parallel.tp=2); results equal "
                             "one process's")
    parser.set_defaults(overrides=[])


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
    args.argv = argv
    try:
        return args.handler(args)
    except USER_ERRORS as e:
        from launcher.torchrun import report_user_error

        if not report_user_error(str(e)):  # (a rank under `megacore train --nproc` tells the launcher)
            print(f"megacore: error: {e}", file=sys.stderr, flush=True)
        return USAGE_ERROR


def run() -> None:
    """The `megacore` command (and each rank's `python -m megacore.cli`): main(), then an immediate exit.
    Finalising an interpreter that has imported torch takes about a second (module teardown, C++
    destructors) that nothing of ours needs, paid by every command and every rank: atexit handlers
    (W&B, logging) run, output is flushed, then os._exit with main's status."""
    try:
        status = main()
    except SystemExit as e:  # argparse's errors and --help
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        status = 130
    except BaseException:  # a bug: its traceback, as Python would print it
        traceback.print_exc()
        status = 1
    exit_now(status)


def exit_now(status: int) -> None:
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
