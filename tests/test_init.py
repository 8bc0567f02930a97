"""The model is built on the meta device and each rank materialises only its shards; the initial
weights are the same on every layout (torch.equal, gathered), and the same as one process building the
whole model with the same seed."""

import os
import subprocess
import sys

import pytest
import torch

from megacore.checkpoint.dcp import load_dcp_weights
from megacore.config import load_config
from megacore.model import Llama
from megacore.model import init as model_init
from tests.helpers import REPO, failure_message

# Uneven splits on purpose: 301 vocabulary rows over 4 FSDP ranks (76, 76, 76, 73) and 2 TP ranks.
MODEL = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=301",
         "data.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2", "train.seed=7"]
LAYOUTS = {"one_rank": (1, []), "fsdp4": (4, []), "tp2_fsdp2": (4, ["parallel.tp=2"]),
           "pp2_tp2": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1"])}


def _probe(out, nproc: int, overrides: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "tests/init_probe.py", str(out), *MODEL, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure_message(proc)


def test_initial_weights_identical_on_every_layout(tmp_path):
    cfg = load_config(REPO / "configs/tiny.yaml", MODEL)
    torch.manual_seed(cfg.train.seed)
    reference = Llama(cfg.model).state_dict()  # one process, the whole model
    for name, (nproc, overrides) in LAYOUTS.items():
        _probe(tmp_path / name, nproc, overrides)
        with torch.device("meta"):
            gathered = Llama(cfg.model)
        gathered.to_empty(device="cpu")
        load_dcp_weights(gathered, tmp_path / name)
        for key, value in gathered.state_dict().items():
            assert torch.equal(value, reference[key]), (name, key)


def test_any_slice_of_a_parameter_draws_the_values_of_the_whole(monkeypatch):
    # Small blocks and chunks, so that slices start and end inside blocks and span several chunks.
    monkeypatch.setattr(model_init, "BLOCK", 1000)
    monkeypatch.setattr(model_init, "CHUNK_ELEMENTS", 3000)
    whole = torch.empty(37, 1000)
    model_init.init_slice(whole, "w", whole.shape, (0, 0), 0.02, seed=3)
    assert whole.std().item() == pytest.approx(0.02, rel=0.05)
    for r0, rows, c0, cols in [(0, 37, 0, 1000), (5, 17, 100, 300), (36, 1, 999, 1), (9, 10, 0, 500), (0, 1, 0, 1)]:
        piece = torch.empty(rows, cols)
        model_init.init_slice(piece, "w", whole.shape, (r0, c0), 0.02, seed=3)
        assert torch.equal(piece, whole[r0:r0 + rows, c0:c0 + cols]), (r0, rows, c0, cols)
    flat = torch.empty(2500)
    model_init.init_slice(flat, "v", flat.shape, (0,), 1.0, seed=3)
    piece = torch.empty(1234)
    model_init.init_slice(piece, "v", flat.shape, (999,), 1.0, seed=3)
    assert torch.equal(piece, flat[999:999 + 1234])
    other = torch.empty(2500)
    model_init.init_slice(other, "v2", other.shape, (0,), 1.0, seed=3)
    assert not torch.equal(other, flat), "each parameter has its own values"


def test_init_from_a_sharded_bf16_hf_directory_reads_slices_into_tp2_fsdp2(tmp_path):
    """train.init_from=HF_DIR with model.safetensors.index.json and bf16 tensors: every rank reads only its
    slices of each tensor; gathered, they are the directory's weights in fp32."""
    import json

    from safetensors.torch import save_file

    from megacore.checkpoint.hf import hf_config, to_hf_name

    cfg = load_config(REPO / "configs/tiny.yaml", MODEL)
    torch.manual_seed(99)
    source = {k: v.to(torch.bfloat16) for k, v in Llama(cfg.model).state_dict().items()}
    hf = tmp_path / "hf"
    hf.mkdir()
    names = sorted(source)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in files.items():
        save_file({to_hf_name(k): source[k].contiguous() for k in keys}, str(hf / file))
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {to_hf_name(k): file for file, keys in files.items() for k in keys}}))
    (hf / "config.json").write_text(json.dumps(hf_config(cfg.model)))
    _probe(tmp_path / "loaded", 4, ["parallel.tp=2", f"train.init_from={hf}"])
    with torch.device("meta"):
        gathered = Llama(cfg.model)
    gathered.to_empty(device="cpu")
    load_dcp_weights(gathered, tmp_path / "loaded")
    for key, value in gathered.state_dict().items():
        assert torch.equal(value, source[key].float()), key
