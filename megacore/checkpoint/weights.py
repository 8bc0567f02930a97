"""Weights only: a checkpoint of either backend and any layout as one process's whole model.

Used by `eval`, `generate`, `export-hf`, `checkpoints consolidate` and `train.init_from`: none of them
needs the optimizer state or the layout that wrote the checkpoint.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from data_pipeline.shards import TOKENIZER, file_sha256, read_manifest
from data_pipeline.tokenizer import HF_TOKENIZER, Tokenizer, copy_tokenizer, load_tokenizer
from megacore.checkpoint.dcp import load_dcp_weights, load_sharded_weights, save_dcp_weights
from megacore.checkpoint.meta import META, read_meta
from megacore.checkpoint.store import commit_directory, latest_checkpoint, list_checkpoints, resolve_checkpoint
from megacore.config import Config, ConfigError, save_config
from megacore.model import Llama
from megacore.run_dir import CHECKPOINTS, CONFIG, load_run_config


def load_model_weights(model: nn.Module, path: str | Path) -> Path:
    """Whole-model fp32 weights from a run or checkpoint directory (either backend, any layout) into an
    unparallelized model, on one process; returns the checkpoint used."""
    ckpt = resolve_checkpoint(path)
    if read_meta(ckpt).backend == "deepspeed":
        from megacore.checkpoint.deepspeed import consolidated_state_dict

        model.load_state_dict(consolidated_state_dict(ckpt))
    else:
        load_dcp_weights(model, ckpt)
    return ckpt


def check_init_from(cfg: Config) -> None:
    """Before any process starts (cheap: JSON and one tokenizer file): train.init_from is a model this run
    can start from: the same shapes and features (Hugging Face directories), and the tokenizer that
    data.dir was prepared with (both hashes named otherwise)."""
    source = Path(cfg.train.init_from)
    if (source / "config.json").is_file():
        from megacore.checkpoint.hf import check_hf_config, read_hf_config

        check_hf_config(read_hf_config(source), cfg.model, source)
        has_tokenizer = (source / HF_TOKENIZER).is_file() or (source / TOKENIZER).is_file()
        tokenizer = source
        theirs = load_tokenizer(source).sha256 if has_tokenizer else None
    else:
        ckpt = source if (source / META).is_file() else latest_checkpoint(source)
        if ckpt is None:
            raise FileNotFoundError(f"train.init_from={source}: no checkpoint there (a megacore run or checkpoint "
                                    f"directory, or a Hugging Face directory with config.json)")
        theirs = read_meta(ckpt).tokenizer_sha256 or file_sha256(ckpt.parent.parent / TOKENIZER)
    ours = read_manifest(cfg.data.dir)["tokenizer"]["sha256"]
    if theirs is not None and theirs != ours:
        raise ConfigError(f"train.init_from={source} was trained with tokenizer sha256 {theirs}, but data.dir="
                          f"{cfg.data.dir} is tokenized with {ours}: prepare the data with "
                          f"data.tokenizer_from={source if not (source / 'config.json').is_file() else tokenizer}")


def init_weights_from(model: Llama, source: str) -> None:
    """train.init_from: whole-model weights from a Hugging Face directory or a megacore run/checkpoint."""
    if (Path(source) / "config.json").is_file():
        from megacore.checkpoint.hf import load_hf_into

        load_hf_into(model, source)
    else:
        load_model_weights(model, source)


def load_weights_into_shards(parts: list[nn.Module], source: str) -> None:
    """train.init_from on a parallelized model: every rank reads only the slices its shards hold, from a
    Hugging Face directory (safetensors slices) or a torch-backend run/checkpoint (DCP). A DeepSpeed
    run's weights are consolidated whole on each rank first (its files are not sliceable)."""
    if (Path(source) / "config.json").is_file():
        from megacore.checkpoint.hf import load_hf_slices

        load_hf_slices(parts, source)
        return
    ckpt = resolve_checkpoint(source)
    if read_meta(ckpt).backend == "deepspeed":
        from megacore.checkpoint.deepspeed import consolidated_state_dict
        from megacore.parallel.materialize import load_slices

        full = consolidated_state_dict(ckpt)
        load_slices(parts, lambda name, shape, offset, local: full[name][
            tuple(slice(o, o + n) for o, n in zip(offset, local))])
    else:
        load_sharded_weights(parts, ckpt)


class TrainedModel(NamedTuple):
    """A trained model for one process (eval, generate, export): where it came from, by name."""

    model: Llama  # in eval mode
    tokenizer: Tokenizer
    config: Config  # the run's config (a published model's: its model section, defaults elsewhere)
    source: Path  # the checkpoint directory, or the Hugging Face directory


def load_trained(path: str | Path, device: str = "cpu") -> TrainedModel:
    """Model (eval mode), tokenizer and config from a run directory or one of its checkpoints, or from a
    published model's Hugging Face directory (its config.json defines the model)."""
    if (Path(path) / "config.json").is_file():
        return load_published(path, device)
    ckpt = resolve_checkpoint(path)
    run_dir = ckpt.parent.parent
    cfg = load_run_config(run_dir)
    tokenizer = load_tokenizer(run_dir)
    model = empty_model(cfg, device)
    load_model_weights(model, ckpt)
    return TrainedModel(model.eval(), tokenizer, cfg, ckpt)


def load_published(path: str | Path, device: str = "cpu") -> TrainedModel:
    """A Hugging Face directory as `load_trained` gives a run: the model its config.json describes, with
    its weights and tokenizer; the rest of the config is the defaults."""
    from megacore.checkpoint.hf import load_hf_into, read_hf_config
    from megacore.checkpoint.hf_config import model_config_from_hf

    path, cfg = Path(path), Config()
    cfg.model = model_config_from_hf(read_hf_config(path), cfg.model, path)
    model = empty_model(cfg, device)
    load_hf_into(model, path)
    return TrainedModel(model.eval(), load_tokenizer(path), cfg, path)


def empty_model(cfg: Config, device: str | torch.device = "cpu") -> Llama:
    """The model with allocated, uninitialised weights (they are about to be loaded: no init work)."""
    with torch.device("meta"):
        model = Llama(cfg.model)
    model.to_empty(device=device)
    model.init_buffers()
    return model


def consolidate(source: str | Path, out: str | Path) -> Path:
    """Write a checkpoint of either backend as a weights-only, single-file-set DCP checkpoint in a new run
    directory OUT (config with backend=torch, tokenizer): eval, generate, export-hf and train.init_from
    read it like any torch-backend run. Returns the new checkpoint directory."""
    ckpt = resolve_checkpoint(source)
    run_dir, out = ckpt.parent.parent, Path(out)
    if list_checkpoints(out):
        raise FileExistsError(f"{out} already has checkpoints; choose a new directory")
    cfg = load_run_config(run_dir)
    model = empty_model(cfg)
    load_model_weights(model, ckpt)
    cfg.parallel = type(cfg.parallel)()  # a plain torch-backend layout; any layout can load it
    meta = dataclasses.replace(read_meta(ckpt), weights_only=True, consolidated_from=str(ckpt.resolve()),
                               config=cfg.to_dict())
    final = out / CHECKPOINTS / ckpt.name
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_config(cfg, out / CONFIG)
    copy_tokenizer(load_tokenizer(run_dir), out)
    save_dcp_weights(model, tmp)
    commit_directory(tmp, final, meta)
    return final
