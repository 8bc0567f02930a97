"""Downstream tasks from local JSON-lines files, scored exactly as lm-evaluation-harness scores them.

Two kinds, by the fields of the first line:
- multiple choice, `{"context": str, "choices": [str, ...], "label": int}`: each choice is scored as the
  continuation `" " + choice` (lm-eval's default target delimiter) by the sum of its tokens'
  log-likelihoods; `acc` takes the argmax, `acc_norm` the argmax of the log-likelihood over the choice's
  length in characters (lm-eval's `output_type: multiple_choice`).
- language modelling on a target, `{"context": str, "target": str}` (LAMBADA): the target's summed
  log-likelihood (continuation `target` as given), `perplexity` = exp(-mean of those sums), and `acc`:
  whether greedy decoding reproduces every target token (lm-eval's `output_type: loglikelihood`).

Context and continuation are tokenised as lm-eval's `_encode_pair` does: trailing spaces of the context move
to the continuation, the continuation's tokens are those of `context + continuation` after the context's,
both with the special tokens the model's tokenizer adds by default; an empty context is the BOS token (or
EOS where there is none). Requests longer than the model's window keep their last tokens, as lm-eval does.
Standard errors are lm-eval's: the sample standard deviation of the per-item scores over sqrt(n).

`score_task` runs on a train module of any layout: each data-parallel slice scores its share of the
requests (each row a request, padded to data.seq_len), the ranks that hold the loss contribute each row's
summed log-likelihood, correct-token and target-token counts, and one all-reduce of 3 x requests numbers
gives every rank all of them. What grows with what: requests (items x choices) tokenised once; one forward
per data-parallel batch; memory of one batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch
import torch.distributed as dist

from megacore.errors import DataError
from megacore.loss import IGNORE_INDEX


@dataclass(frozen=True)
class Task:
    name: str
    path: str
    kind: str  # "multiple_choice" or "loglikelihood"
    items: list[dict]


@dataclass(frozen=True)
class Request:
    item: int
    context: list[int]
    continuation: list[int]


def parse_task_arg(arg: str, option: str = "--task") -> tuple[str, str]:
    """NAME=FILE -> (name, file); refused naming the argument otherwise."""
    name, sep, path = arg.partition("=")
    if not sep or not name or not path or "/" in name:
        raise DataError(f"{option} {arg!r} is not of the form NAME=FILE.jsonl")
    return name, path


def load_task(name: str, path: str) -> Task:
    """A task file, every line checked; a bad line is named by file, line number and key."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"task {name}: no such file {path}") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("context"), str):
            raise DataError(f"{path}:{number}: needs a string \"context\"")
        items.append(item)
    if not items:
        raise DataError(f"{path}: no items")
    kind = "multiple_choice" if "choices" in items[0] else "loglikelihood"
    for number, item in enumerate(items, 1):
        where = f"{path}: item {number}"
        if kind == "multiple_choice":
            choices, label = item.get("choices"), item.get("label")
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
                raise DataError(f"{where}: \"choices\" must be a list of non-empty strings (the first item has "
                                f"choices: every item is multiple choice)")
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
                raise DataError(f"{where}: \"label\" must be the index of the right choice, 0..{len(choices) - 1}, "
                                f"got {label!r}")
        elif not isinstance(item.get("target"), str) or not item["target"]:
            raise DataError(f"{where}: needs a non-empty string \"target\" (or \"choices\" and \"label\" for "
                            f"multiple choice, as the first item decides)")
    return Task(name, path, kind, items)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`, and its empty-context rule (checked first, as lm-eval's `loglikelihood` does):
    the context is the BOS token (EOS without one), or the continuation's first token when it is that."""
    if context == "":
        prefix = tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id
        ids = tokenizer.encode(continuation)
        return ([prefix], ids) if not ids or ids[0] != prefix else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode_as_published(context + continuation)
    context_ids = tokenizer.encode_as_published(context)
    return context_ids, whole[len(context_ids):]


def task_requests(task: Task, tokenizer) -> list[Request]:
    """One request per choice (multiple choice) or per item, in item order."""
    out = []
    for i, item in enumerate(task.items):
        continuations = [" " + c for c in item["choices"]] if task.kind == "multiple_choice" else [item["target"]]
        for text in continuations:
            out.append(Request(i, *encode_pair(tokenizer, item["context"], text)))
    return out


def request_rows(requests: list[Request], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of each request, right-padded to seq_len: labels on the continuation's
    positions only. A request over seq_len + 1 tokens keeps its last ones (lm-eval's truncation)."""
    inputs = torch.zeros(len(requests), seq_len, dtype=torch.long)
    labels = torch.full((len(requests), seq_len), IGNORE_INDEX, dtype=torch.long)
    for row, r in enumerate(requests):
        whole = (r.context + r.continuation)[-(seq_len + 1):]
        n = len(whole) - 1
        inputs[row, :n] = torch.tensor(whole[:-1])
        cont = min(len(r.continuation), n)
        if cont:  # (an empty continuation scores 0 and greedy, as in lm-eval)
            labels[row, n - cont:n] = torch.tensor(whole[-cont:])
    return inputs, labels


@torch.no_grad()
def score_requests(module, requests: list[Request], seq_len: int, rows_per_batch: int) -> torch.Tensor:
    """(requests, 3): summed log-likelihood, correct tokens, target tokens of each request's continuation,
    on every rank. Each data-parallel slice scores requests dp_rank::dp_size in batches of
    `rows_per_batch` rows (the last padded with empty rows: every rank runs the same number of batches)."""
    dp_rank, dp_size = module.dp_rank, module.dp_size
    mine = list(range(dp_rank, len(requests), dp_size))
    per_rank = math.ceil(len(requests) / dp_size)
    out = torch.zeros(len(requests), 3, dtype=torch.float64, device=module.device)
    module.train(False)
    layout = module.layout
    for start in range(0, per_rank, rows_per_batch):
        chunk = mine[start:start + rows_per_batch]
        width = seq_len
        if layout.pp == 1:  # rows as long as this batch's longest request (pipeline stages keep one shape),
            # a multiple of what sequence and context parallelism split
            multiple = 2 * layout.cp * layout.tp
            longest = max((len(requests[i].context) + len(requests[i].continuation) - 1 for i in chunk), default=1)
            width = min(seq_len, -(-max(longest, 1) // multiple) * multiple)
        inputs, labels = request_rows([requests[i] for i in chunk], width)
        pad = rows_per_batch - len(chunk)
        inputs = torch.cat([inputs, torch.zeros(pad, width, dtype=torch.long)])
        labels = torch.cat([labels, torch.full((pad, width), IGNORE_INDEX, dtype=torch.long)])
        positions = torch.arange(width).expand(rows_per_batch, width)  # (one document per request)
        rows = module.score_batch({"input_ids": inputs, "labels": labels, "position_ids": positions})
        if module.reports_loss and chunk:
            out[chunk, :2] += rows[:len(chunk)].to(out)
        if module.counts_tokens and chunk:
            out[chunk, 2] = (labels[:len(chunk)] != IGNORE_INDEX).sum(-1).to(out)
    module.train(True)
    dist.all_reduce(out)
    return out.cpu()


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance) / math.sqrt(n)


def task_results(task: Task, requests: list[Request], scores: torch.Tensor) -> dict:
    """lm-eval's metrics from the requests' (log-likelihood, correct, targets) rows."""
    loglik = (-scores[:, 0]).tolist()  # (score_batch gives summed losses: negated log-likelihoods)
    greedy = (scores[:, 1] == scores[:, 2]).tolist()
    by_item: dict[int, list[int]] = {}
    for index, r in enumerate(requests):
        by_item.setdefault(r.item, []).append(index)
    if task.kind == "multiple_choice":
        acc, acc_norm = [], []
        for i, item in enumerate(task.items):
            lls = [loglik[j] for j in by_item[i]]
            norm = [ll / len(choice) for ll, choice in zip(lls, item["choices"])]
            acc.append(float(lls.index(max(lls)) == item["label"]))  # (first of equal maxima, as np.argmax)
            acc_norm.append(float(norm.index(max(norm)) == item["label"]))
        (a, a_se), (n, n_se) = _mean_and_stderr(acc), _mean_and_stderr(acc_norm)
        return {"acc": a, "acc_stderr": a_se, "acc_norm": n, "acc_norm_stderr": n_se, "items": len(task.items)}
    lls = [loglik[by_item[i][0]] for i in range(len(task.items))]
    hits = [float(greedy[by_item[i][0]]) for i in range(len(task.items))]
    a, a_se = _mean_and_stderr(hits)
    mean_ll = sum(lls) / len(lls)
    # (exp overflows past 709 nats: an early checkpoint on long targets; lm-eval would raise there)
    perplexity = math.exp(-mean_ll) if -mean_ll < 700 else math.inf
    return {"perplexity": perplexity, "loglikelihood": mean_ll, "acc": a, "acc_stderr": a_se,
            "items": len(task.items)}


class TaskSet:
    """Tasks tokenised once for a run's model, scored on its train module (`train.eval_tasks`, `eval --task`)."""

    def __init__(self, specs: list[tuple[str, str]], tokenizer):
        self.tasks = [load_task(name, path) for name, path in specs]
        self.requests = [task_requests(task, tokenizer) for task in self.tasks]

    def longer_than(self, seq_len: int) -> int:
        """Requests that a window of seq_len tokens cuts (their first tokens are left out)."""
        return sum(len(r.context) + len(r.continuation) - 1 > seq_len for rs in self.requests for r in rs)

    def run(self, module, seq_len: int, rows_per_batch: int) -> dict[str, dict]:
        return {task.name: task_results(task, requests, score_requests(module, requests, seq_len, rows_per_batch))
                for task, requests in zip(self.tasks, self.requests)}


def save_results(run_dir: str | Path, step: int, results: dict[str, dict]) -> Path:
    """RUN_DIR/evals/step_XXXXXXXX.json: {task: metrics}."""
    from data_pipeline.durable import write_text_atomic
    from megacore.run_dir import EVALS

    path = Path(run_dir) / EVALS / f"step_{step:08d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    before = json.loads(path.read_text()) if path.is_file() else {}  # (other tasks of the same step stay)
    write_text_atomic(path, json.dumps({**before, **results}, indent=2) + "\n")
    return path
