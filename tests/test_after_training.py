"""After training, at any size: `export-hf` and `checkpoints consolidate` stream a checkpoint tensor by
tensor (the files equal today's whole-model writes byte for byte, in a fraction of the model's memory),
`eval` and `generate --nproc N` shard the model over real torchrun ranks with one process's results,
and ZeRO-3 `train.init_from` fills each rank's partitions without the whole model."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from megacore.checkpoint.hf import hf_state
from megacore.checkpoint.store import list_checkpoints
from megacore.checkpoint.weights import load_trained
from tests.helpers import NO_EVAL, megacore, peak_resident, read_metrics, tiny_run_args

# Deep and narrow (45M parameters, 181 MB in fp32): its largest tensor is 2% of it, so a streamed export's
# memory is far below a quarter of the weights while a whole-model export needs all of them.
DEEP = ["model.dim=512", "model.n_layers=16", "model.n_heads=8", "model.n_kv_heads=4", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=1", "train.steps=1", "train.peak_tflops=0.1",
        "train.eval_every=1000"]
# What a bare process of the export holds before any weight: torch and megacore's modules imported.
BARE = ["-c", "import torch, megacore.commands, megacore.checkpoint.hf, megacore.checkpoint.weights, "
              "megacore.checkpoint.streaming"]


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory, data_dir):
    """A 38M-parameter model trained one step on 4 FSDP ranks (its checkpoint holds 4 shards of each tensor)."""
    run = tmp_path_factory.mktemp("after") / "deep"
    megacore("train", "configs/tiny.yaml", f"data.dir={data_dir}", f"train.run_dir={run}", *DEEP, "--nproc", "4",
             timeout=600)
    return run


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_export_streams_the_checkpoint_into_todays_files_in_a_quarter_of_the_memory(deep_run, tmp_path):
    from transformers import LlamaForCausalLM

    bare, _ = peak_resident(*BARE)
    peak, proc = peak_resident("-m", "megacore", "export-hf", deep_run, tmp_path / "hf")
    assert proc.stdout.splitlines()[0] == f"exported {list_checkpoints(deep_run)[-1]} to {tmp_path / 'hf'}"
    ours = load_trained(deep_run).model
    weights = _weight_bytes(ours)
    assert peak - bare < weights / 4, f"export held {(peak - bare) / 2**20:.0f} MiB of {weights / 2**20:.0f} MiB"

    # Today's whole-model export: every tensor in memory, written by safetensors itself.
    state = {k: v.contiguous() for k, v in hf_state(ours).items()}
    save_file(state, tmp_path / "whole.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    # A published directory streams too: exported again, the same file.
    megacore("export-hf", tmp_path / "hf", tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-4)

    # bf16: half the bytes, the same files as safetensors writes for the rounded tensors.
    megacore("export-hf", deep_run, tmp_path / "bf16", "--dtype", "bf16")
    save_file({k: v.bfloat16() for k, v in state.items()}, tmp_path / "whole16.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "bf16" / "model.safetensors").read_bytes() == (tmp_path / "whole16.safetensors").read_bytes()
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float32"


def test_consolidate_streams_into_todays_dcp_files(deep_run, tmp_path):
    import torch.distributed.checkpoint as dcp

    bare, _ = peak_resident(*BARE)
    peak, proc = peak_resident("-m", "megacore", "checkpoints", "consolidate", deep_run, tmp_path / "one")
    ours = load_trained(deep_run).model
    assert peak - bare < _weight_bytes(ours) / 4
    ckpt = list_checkpoints(tmp_path / "one")[-1]
    assert proc.stdout.strip() == f"consolidated weights in {ckpt}"
    # Today's consolidation: the whole model saved by DCP from one process. The data file is the same byte
    # for byte (.metadata differs only in its storage_meta: the path and a random id of each save).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": ours.state_dict()}, checkpoint_id=str(tmp_path / "whole"), no_dist=True)
    assert (ckpt / "__0_0.distcp").read_bytes() == (tmp_path / "whole" / "__0_0.distcp").read_bytes()
    again = load_trained(tmp_path / "one").model
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))

    megacore("checkpoints", "consolidate", deep_run, tmp_path / "half", "--dtype", "bf16")
    half = load_trained(tmp_path / "half").model  # (loads as fp32: the bf16 values)
    assert all(torch.equal(a.bfloat16().float(), b) for a, b in zip(ours.state_dict().values(), half.state_dict().values()))
    assert sum(f.stat().st_size for f in list_checkpoints(tmp_path / "half")[-1].glob("*.distcp")) < \
        0.55 * sum(f.stat().st_size for f in ckpt.glob("*.distcp"))


@pytest.fixture(scope="module")
def small(tmp_path_factory, data_dir):
    """The tiny model trained 2 steps on 2 FSDP ranks."""
    run = tmp_path_factory.mktemp("after") / "small"
    megacore("train", *tiny_run_args(data_dir, run, "train.steps=2", *NO_EVAL), "--nproc", "2")
    return run


EVAL = ["--batches", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def one_process_eval(small):
    return json.loads(megacore("eval", small, *EVAL).stdout)


@pytest.mark.parametrize("nproc, layout", [(2, []), (4, []), (4, ["parallel.tp=2"]), (2, ["parallel.pp=2"])],
                         ids=["fsdp2", "fsdp4", "tp2", "pp2"])
def test_eval_on_n_ranks_equals_one_process(small, one_process_eval, nproc, layout):
    one = one_process_eval
    proc = megacore("eval", small, *EVAL, "--nproc", str(nproc), *layout)
    assert len(proc.stdout.splitlines()) == 1, "rank 0 alone prints the result: " + proc.stdout
    many = json.loads(proc.stdout)
    assert many["tokens"] == one["tokens"] == 2 * 8 * 64
    for key in ("loss", "bits_per_byte", "accuracy"):
        assert many[key] == pytest.approx(one[key], abs=1e-5), key
    assert many["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)  # (exp of the loss)


def test_a_long_evaluation_in_a_job_log_reports_progress(monkeypatch, capsys):
    """Not a terminal (a Slurm log): a plain line every 30 s, none once the last batch is done."""
    from megacore.eval import evaluate

    clock = iter(range(0, 1000, 20))  # each batch takes 20 s
    monkeypatch.setattr(evaluate.time, "monotonic", lambda: next(clock))
    assert list(evaluate._progress(5, show=True)) == list(range(5))
    assert capsys.readouterr().err.splitlines() == ["eval: 2/5 batches, 0.05 batches/s", "eval: 4/5 batches, 0.05 batches/s"]


def test_generate_on_two_ranks_gives_the_greedy_text_of_one_process(small):
    args = ["generate", small, "--prompt", "ROMEO.", "--temperature", "0", "--max-new-tokens", "24"]
    one = megacore(*args).stdout
    two = megacore(*args, "--nproc", "2").stdout
    assert two == one and one.startswith("ROMEO.")
    refused = megacore(*args, "--nproc", "2", "parallel.tp=2", check=False)
    assert refused.returncode == 2 and "parallel.tp=2 does not apply to decoding" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.fixture(scope="module")
def zero3_fresh(deep_run, data_dir, tmp_path_factory):
    """ZeRO-3 on 2 ranks from its own initialisation: what building the partitioned model costs by itself."""
    run = tmp_path_factory.mktemp("after") / "zero3_fresh"
    megacore("train", "configs/tiny.yaml", *DEEP, f"data.dir={data_dir}", f"train.run_dir={run}",
             "parallel.backend=deepspeed", "parallel.zero_stage=3", "--nproc", "2", timeout=600)
    return json.loads((run / "memory.json").read_text())["ranks"]


@pytest.fixture(scope="module")
def torch_from_deep(deep_run, data_dir, tmp_path_factory):
    """The first loss of the torch backend on 2 ranks started from the deep run (a Hugging Face export of it
    holds the same fp32 weights)."""
    run = tmp_path_factory.mktemp("after") / "torch_from_deep"
    megacore("train", "configs/tiny.yaml", *DEEP, f"data.dir={data_dir}", f"train.run_dir={run}",
             f"train.init_from={deep_run}", "--nproc", "2", timeout=600)
    return read_metrics(run)[1]["loss"]


@pytest.mark.parametrize("source", ["hf", "run"])
def test_zero3_init_from_fills_partitions_with_the_torch_backends_first_loss(deep_run, data_dir, zero3_fresh,
                                                                             torch_from_deep, tmp_path, source):
    """ZeRO-3 on 2 ranks from a Hugging Face export (safetensors slices) or a torch-backend run (a tensor at
    a time): loading adds far less than the whole model to any rank's peak while the model is built (the
    same build from its own initialisation is the reference), and the first step's loss equals the torch
    backend's from the same directory."""
    src = deep_run if source == "run" else tmp_path / "hf"
    if source == "hf":
        megacore("export-hf", deep_run, src)
    megacore("train", "configs/tiny.yaml", *DEEP, f"data.dir={data_dir}", f"train.init_from={src}",
             f"train.run_dir={tmp_path / 'zero3'}", "parallel.backend=deepspeed", "parallel.zero_stage=3",
             "--nproc", "2", timeout=600)
    assert read_metrics(tmp_path / "zero3")[1]["loss"] == pytest.approx(torch_from_deep, rel=1e-5)
    whole = _weight_bytes(load_trained(deep_run).model)
    loaded = json.loads((tmp_path / "zero3" / "memory.json").read_text())["ranks"]
    for rank, fresh in zip(loaded, zero3_fresh):
        more = rank["peak_resident_after_model"] - fresh["peak_resident_after_model"]
        assert more < whole / 4, f"rank {rank['rank']}: loading added {more / 2**20:.0f} MiB to a " \
                                 f"{whole / 2**20:.0f} MiB model's build"
