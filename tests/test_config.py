"""Configs: YAML + dotted overrides, typed, and refused with the key named before anything starts."""

import re

import pytest

from megacore.config import Config, ConfigError, load_config
from megacore.preflight import preflight
from tests.helpers import REPO, megacore


def test_embedded_default_loads_and_is_valid():
    cfg = load_config(REPO / "configs/tiny.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


def test_overrides_are_typed():
    cfg = load_config(REPO / "configs/tiny.yaml", ["optim.lr=3e-4", "model.n_layers=2", "train.stop_after=5",
                                                   "model.tie_embeddings=true", "data.sources=[a.txt, b.txt]"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.n_layers == 2 and cfg.train.stop_after == 5
    assert cfg.model.tie_embeddings is True
    assert cfg.data.sources == ["a.txt", "b.txt"]


@pytest.mark.parametrize("override, named", [
    ("no.such.key=1", "no.such.key"),
    ("optim.no_such=1", "optim.no_such"),
    ("optim.lr=fast", "optim.lr"),
    ("model.n_layers=2.5", "model.n_layers"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("optim.lr=-1", "optim.lr"),
    ("model.n_heads=7", "model.n_heads"),
    ("train.stop_after=100000", "train.stop_after"),
    ("data.seq_len=4096", "data.seq_len"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("parallel.zero_stage=4", "parallel.zero_stage"),
    ("parallel.offload_optimizer=true", "parallel.offload_optimizer"),
])
def test_bad_values_are_refused_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(REPO / "configs/tiny.yaml", [override])


def test_cli_exits_2_naming_unknown_key_before_starting_processes():
    proc = megacore("train", "configs/tiny.yaml", "no.such.key=1", "--nproc", "2", check=False)
    assert proc.returncode == 2
    assert "no.such.key" in proc.stderr
    assert "torch.distributed.run" not in proc.stderr  # refused before torchrun was started


def test_cli_names_missing_data_directory(tmp_path):
    missing = tmp_path / "nowhere"
    proc = megacore("train", "configs/tiny.yaml", f"data.dir={missing}", check=False)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr


def test_cli_refuses_layout_that_does_not_divide_the_batch():
    proc = megacore("train", "configs/tiny.yaml", "--nproc", "3", check=False)
    assert proc.returncode == 2
    assert "train.global_batch_size" in proc.stderr


def test_cli_names_missing_config_file(tmp_path):
    proc = megacore("train", str(tmp_path / "absent.yaml"), check=False)
    assert proc.returncode == 2 and "absent.yaml" in proc.stderr


@pytest.mark.parametrize("overrides, named", [
    (["parallel.tp=2"], "parallel.tp=2 with parallel.backend=deepspeed"),
    (["parallel.pp=2"], "parallel.pp=2 with parallel.backend=deepspeed"),
    (["parallel.dp_replicate=2"], "parallel.dp_replicate=2 with parallel.backend=deepspeed"),
    (["parallel.compile=true"], "parallel.compile"),
    (["parallel.activation_checkpointing=full"], "parallel.activation_checkpointing"),
    (["parallel.zero_stage=2", "parallel.offload_params=true"], "parallel.offload_params needs parallel.zero_stage=3"),
    (["checkpoint.async_save=true"], "checkpoint.async_save"),
])
def test_deepspeed_refuses_what_it_cannot_do(overrides, named):
    """The support matrix's "refused" cells, named in our terms, by the one preflight."""
    with pytest.raises(ConfigError, match=re.escape(named)):
        preflight(load_config(REPO / "configs/tiny.yaml", ["parallel.backend=deepspeed", *overrides]), 2, data=False)


def test_deepspeed_refusal_comes_before_any_process_starts():
    proc = megacore("train", "configs/tiny.yaml", "parallel.backend=deepspeed", "parallel.tp=2", "--nproc", "2",
                    check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "parallel.tp=2 with parallel.backend=deepspeed" in proc.stderr
