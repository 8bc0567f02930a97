"""parallel.backend=deepspeed: ZeRO 1/2/3 (and 3 with CPU offload) train the same model with the losses of
the torch FSDP2 backend, checkpoint through our commit protocol, resume exactly, and consolidate into
weights that the torch path loads with the same logits. Real 2-rank torchrun runs on gloo."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from megacore.checkpoint.hf import hf_state
from megacore.checkpoint.store import list_checkpoints
from megacore.checkpoint.weights import load_model_weights, load_trained
from tests.helpers import PlantedPayload, assert_same_weights, megacore, read_metrics, rewrite_manifest, tiny_run_args

STEPS = ["train.steps=12", "checkpoint.every=6", "train.eval_every=6", "checkpoint.keep_last=0"]
ZERO = {"zero1": ["parallel.zero_stage=1"], "zero2": ["parallel.zero_stage=2"], "zero3": ["parallel.zero_stage=3"],
        "zero3_offload": ["parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_params=true"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("deepspeed")

    def args(name, *extra):
        return tiny_run_args(data_dir, root / name, *STEPS, *extra)

    megacore("train", *args("fsdp2"), "--nproc", "2")
    return root, args


@pytest.mark.parametrize("name", list(ZERO))
def test_zero_stage_trains_with_the_losses_of_fsdp2(runs, name):
    root, args = runs
    proc = megacore("train", *args(name, "parallel.backend=deepspeed", *ZERO[name]), "--nproc", "2", timeout=600)
    assert proc.returncode == 0
    fsdp, ds = read_metrics(root / "fsdp2"), read_metrics(root / name)
    assert sorted(ds) == list(range(1, 13))
    for step in range(1, 13):
        assert ds[step]["loss"] == pytest.approx(fsdp[step]["loss"], rel=1e-4), (name, step)
        assert ds[step]["grad_norm"] == pytest.approx(fsdp[step]["grad_norm"], rel=1e-3), (name, step)
    val_fsdp, val_ds = read_metrics(root / "fsdp2", "val"), read_metrics(root / name, "val")
    assert val_ds[12]["loss"] == pytest.approx(val_fsdp[12]["loss"], rel=1e-4)
    assert [p.name for p in list_checkpoints(root / name)] == ["step_00000006", "step_00000012"]
    assert megacore("checkpoints", "verify", root / name).returncode == 0
    if name.startswith("zero3"):
        # Partitioned at construction (deepspeed.zero.Init): each rank holds half of the weights.
        whole = sum(r["parameters"] for r in json.loads((root / "fsdp2" / "memory.json").read_text())["ranks"])
        for rank in json.loads((root / name / "memory.json").read_text())["ranks"]:
            assert rank["parameters"] == pytest.approx(whole / 2, rel=0.01)


def test_deepspeed_stop_and_resume_continues_exactly(runs):
    root, args = runs
    run = args("zero2_resumed", "parallel.backend=deepspeed", "parallel.zero_stage=2")
    megacore("train", *run, "train.stop_after=6", "--nproc", "2")
    proc = megacore("train", *run, "--resume", "auto", "--nproc", "2")
    assert "resumed from" in proc.stdout and "step_00000006" in proc.stdout
    straight, resumed = read_metrics(root / "zero2"), read_metrics(root / "zero2_resumed")
    assert [resumed[s]["loss"] for s in range(7, 13)] == [straight[s]["loss"] for s in range(7, 13)]
    assert_same_weights(root / "zero2", root / "zero2_resumed", "weights after stop + resume equal the uninterrupted run")
    def meta(r):
        return json.loads((list_checkpoints(r)[-1] / "meta.json").read_text())["loader"]
    assert meta(root / "zero2") == meta(root / "zero2_resumed")


def test_consolidated_checkpoint_gives_the_engine_logits_in_the_torch_path(runs):
    root, args = runs
    out = root / "zero3_consolidated"
    megacore("checkpoints", "consolidate", root / "zero3", out)
    assert megacore("checkpoints", "verify", out).returncode == 0
    # The engine's own validation loss at step 12 (2 batches of 8) equals the torch path's on the same batches.
    result = json.loads(megacore("eval", out, "--batches", "2", "--batch-size", "8").stdout.splitlines()[-1])
    assert result["loss"] == pytest.approx(read_metrics(root / "zero3", "val")[12]["loss"], rel=1e-5)
    # Same weights whether read from the DeepSpeed files or from the consolidated DCP checkpoint.
    a, b = load_trained(root / "zero3")[0], load_trained(out)[0]
    x = torch.randint(0, a.cfg.vocab_size, (2, 16))
    assert torch.equal(a(x), b(x))
    # The consolidated run initialises an FSDP2 run and exports to Hugging Face.
    proc = megacore("train", *args("fsdp2_from_zero3", "train.steps=2", f"train.init_from={out}"), "--nproc", "2")
    assert "initialised weights from" in proc.stdout
    megacore("export-hf", root / "zero3", root / "zero3_hf")
    # Streamed from the ZeRO-3 partitions (DeepSpeed's lazy reader): the file safetensors writes for the whole model.
    save_file({k: v.contiguous() for k, v in hf_state(a).items()}, root / "zero3_whole.safetensors",
              metadata={"format": "pt"})
    assert (root / "zero3_hf" / "model.safetensors").read_bytes() == (root / "zero3_whole.safetensors").read_bytes()
    # Weights only: training cannot resume from it (no optimizer state), and says what to do instead.
    assert load_model_weights(load_trained(out)[0], out).name == "step_00000012"
    proc = megacore("train", *args("zero3_consolidated"), "--resume", "auto", check=False)
    assert proc.returncode == 2 and "weights only" in proc.stderr


def test_deepspeed_checkpoint_refuses_another_world_size_or_backend_before_starting(runs):
    root, args = runs
    shutil.copytree(root / "zero1", root / "zero1_elsewhere")
    proc = megacore("train", *args("zero1_elsewhere", "parallel.backend=deepspeed", "parallel.zero_stage=1"),
                    "--resume", "auto", "--nproc", "1", check=False)
    assert proc.returncode == 2
    assert "written by 2 ranks resumes only on that many" in proc.stderr and "step_00000012" in proc.stderr
    proc = megacore("train", *args("zero1_elsewhere"), "--resume", "auto", "--nproc", "2", check=False)
    assert proc.returncode == 2 and "parallel.backend=deepspeed" in proc.stderr


def test_bf16_engine_trains(runs):
    """bf16 through DeepSpeed's engine (fp32 master weights in the optimizer): same start, falling loss."""
    root, args = runs
    megacore("train", *args("zero2_bf16", "parallel.backend=deepspeed", "parallel.zero_stage=2",
                            "train.mixed_precision=bf16", "train.steps=3"), "--nproc", "2")
    bf16, fp32 = read_metrics(root / "zero2_bf16"), read_metrics(root / "fsdp2")
    assert bf16[1]["loss"] == pytest.approx(fp32[1]["loss"], rel=1e-2)
    assert bf16[3]["loss"] < bf16[1]["loss"]


def test_a_pickle_planted_in_deepspeed_files_runs_nothing(runs, tmp_path):
    root, args = runs
    shutil.copytree(root / "zero2", root / "zero2_planted")
    ckpt = list_checkpoints(root / "zero2_planted")[-1]
    marker = tmp_path / "PWNED"
    for victim in ckpt.glob("*model_states.pt"):
        torch.save({"module": PlantedPayload(marker)}, victim)
    rewrite_manifest(ckpt)
    proc = megacore("eval", root / "zero2_planted", "--batches", "1", check=False)
    assert proc.returncode == 2 and "refused to load" in proc.stderr and "model_states.pt" in proc.stderr
    proc = megacore("train", *args("zero2_planted", "parallel.backend=deepspeed", "parallel.zero_stage=2",
                                   "train.steps=14"), "--resume", "auto", "--nproc", "2", check=False)
    assert proc.returncode == 2 and "refused to load" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists(), "nothing in the checkpoint ran"
