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
from data_pipeline.storage import Location, cache_dir_for, download_tree, exists, is_url, location, tree
from data_pipeline.tokenizer import HF_TOKENIZER, Tokenizer, copy_tokenizer, load_tokenizer
from megacore.checkpoint.dcp import load_dcp_weights, load_sharded_weights
from megacore.checkpoint.meta import read_meta
from megacore.checkpoint.store import (
    commit_directory,
    is_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
)
from megacore.checkpoint.streaming import Weights, checkpoint_weights
from megacore.config import Config, ConfigError, save_config
from megacore.model import Llama
from megacore.run_dir import CHECKPOINTS, CONFIG, RUN_FILES, checkpoint_run_files, load_run_config


def is_published(path: str | Location) -> bool:
    """A Hugging Face model directory (config.json), local or in object storage."""
    return exists(location(path) / "config.json")


def local_published(path: str | Location) -> Path:
    """A published model's directory on local disk: itself, or its download into this node's cache
    (safetensors are read by slices from local files; it costs the model's size on each node). The copy is
    reused while the objects' names, sizes and ETags are unchanged (one listing); a new export at the same
    URL is downloaded again."""
    if not is_url(path):
        return Path(path)
    cache, signature = cache_dir_for("models", path), _signature(location(path))
    marker = cache / ".complete"
    if not marker.is_file() or marker.read_text() != signature:
        shutil.rmtree(cache, ignore_errors=True)
        download_tree(location(path), cache)
        marker.write_text(signature)
    return cache


def _signature(path: Location) -> str:
    """What identifies the objects under a prefix: names, sizes and ETags (or modification times)."""
    import json

    return json.dumps(sorted((rel, info["size"], str(info.get("ETag") or info.get("mtime") or ""))
                             for rel, info in tree(path).items()))




def load_model_weights(model: nn.Module, path: str | Path) -> Location:
    """Whole-model fp32 weights from a run or checkpoint directory (either backend, any layout) into an
    unparallelized model, on one process; returns the checkpoint used. A checkpoint given as such is one
    its caller chose and verified (load_trained, init_source): it is not hashed again; a run directory
    means its newest good checkpoint."""
    ckpt = location(path) if is_checkpoint(path) else resolve_checkpoint(path)
    if read_meta(ckpt).backend == "deepspeed":
        weights = checkpoint_weights(ckpt)
        model.load_state_dict({name: weights.read(name) for name in model.state_dict()})
    else:
        load_dcp_weights(model, ckpt)
    return ckpt


def check_init_from(cfg: Config) -> None:
    """Before any process starts (cheap: JSON and one tokenizer file): train.init_from is a model this run
    can start from: the same shapes and features (Hugging Face directories), and the tokenizer that
    data.dir was prepared with (both hashes named otherwise)."""
    source = location(cfg.train.init_from)
    published = is_published(source)
    if published:
        from megacore.checkpoint.hf import check_hf_config, read_hf_config

        check_hf_config(read_hf_config(source), cfg.model, source, local_published(source))
        has_tokenizer = exists(source / HF_TOKENIZER) or exists(source / TOKENIZER)
        theirs = load_tokenizer(local_published(source)).sha256 if has_tokenizer else None
    else:
        ckpt = source if is_checkpoint(source) else latest_checkpoint(source)
        if ckpt is None:
            raise FileNotFoundError(f"train.init_from={source}: no checkpoint there (a megacore run, checkpoint or "
                                    f"checkpoint.dir, or a Hugging Face directory with config.json)")
        theirs = read_meta(ckpt).tokenizer_sha256 or file_sha256(ckpt.parent.parent / TOKENIZER)
    ours = read_manifest(cfg.data.dir)["tokenizer"]["sha256"]
    if theirs is not None and theirs != ours:
        raise ConfigError(f"train.init_from={source} was trained with tokenizer sha256 {theirs}, but data.dir="
                          f"{cfg.data.dir} is tokenized with {ours}: prepare the data with "
                          f"data.tokenizer_from={source}")


def init_weights_from(model: Llama, source: str) -> None:
    """train.init_from: whole-model weights from a Hugging Face directory or a megacore run/checkpoint."""
    if is_published(source):
        from megacore.checkpoint.hf import load_hf_into

        load_hf_into(model, local_published(source))
    else:
        load_model_weights(model, source)


def init_source(cfg: Config, env) -> str:
    """train.init_from for every rank of a run: `agreed_source`, rank 0 first checking it against this
    run (`check_init_from`)."""
    return agreed_source(cfg.train.init_from, env, check=lambda: check_init_from(cfg))


def agreed_source(path: str, env, check=None) -> str:
    """The model `path` means, the same on every rank: rank 0 runs `check()` and chooses and verifies the
    checkpoint (a run or checkpoint.dir: its newest good one; once, not on every rank: in object storage
    that reads every byte), or takes a published directory as it is, and tells the others; then the first
    rank of each node fetches what lies in object storage into the node's cache (a published model, a
    checkpoint's run files) while the others wait."""
    import torch.distributed as dist

    from megacore.distributed import on_every_rank

    def resolve() -> str:
        if check is not None:
            check()
        return str(path) if is_published(path) else str(resolve_checkpoint(path))

    chosen = [on_every_rank(lambda: resolve() if env.is_main else None, env)]
    dist.broadcast_object_list(chosen, src=0)
    source = chosen[0]
    published = is_published(source)
    fetch = env.local_rank == 0 and is_url(source)
    on_every_rank(lambda: (local_published(source) if published else checkpoint_run_files(location(source)))
                  if fetch else None, env)
    return source


def _cut(weights: Weights):
    """`read(name, shape, offset, local)` of a source read a whole tensor at a time: that box of it."""
    return lambda name, shape, offset, local: weights.read(name)[tuple(slice(o, o + n) for o, n in zip(offset, local))]


def load_weights_into_shards(parts: list[nn.Module], source: str) -> None:
    """train.init_from on a parallelized model: every rank reads only the slices its shards hold, from a
    Hugging Face directory (safetensors slices) or a torch-backend run/checkpoint (DCP). A DeepSpeed
    run's are read a tensor at a time and cut (its files are not sliceable)."""
    if is_published(source):
        from megacore.checkpoint.hf import load_hf_slices

        load_hf_slices(parts, local_published(source))
        return
    ckpt = location(source) if is_checkpoint(source) else resolve_checkpoint(source)  # (resolve_init_from verified it)
    if read_meta(ckpt).backend == "deepspeed":
        from megacore.parallel.materialize import load_slices

        load_slices(parts, _cut(checkpoint_weights(ckpt)))  # (DeepSpeed's lazy reader: a ZeRO-3 tensor at a time)
    else:
        load_sharded_weights(parts, ckpt)


def load_weights_into_partitions(model: nn.Module, source: str) -> None:
    """ZeRO-3 train.init_from: each rank fills only its partitions (megacore/parallel/deepspeed.py), from
    a Hugging Face directory (safetensors slices of the rows they cover) or a run/checkpoint (below)."""
    from megacore.parallel.deepspeed import load_partitions

    if is_published(source):
        from megacore.checkpoint.hf import hf_slice_reader

        load_partitions(model, hf_slice_reader(local_published(source)))
        return
    ckpt = location(source) if is_checkpoint(source) else resolve_checkpoint(source)  # (init_source verified it)
    if read_meta(ckpt).backend == "deepspeed":  # a tensor at a time (ZeRO-1/2: merged whole by DeepSpeed)
        load_partitions(model, _cut(checkpoint_weights(ckpt)))
    else:
        _partitions_from_dcp(model, ckpt)


# Bytes of rows each rank reads per DCP load into ZeRO-3 partitions (a group of tensors at a time).
PARTITION_READ_BYTES = 1 << 30


def _partitions_from_dcp(model: nn.Module, ckpt: Location) -> None:
    """ZeRO-3 partitions from a torch-backend checkpoint: every rank reads 1/world of each tensor's rows
    (a Shard(0) DTensor: DCP reads just those chunks), and one all_to_all per tensor moves each piece to
    the partitions it covers. The checkpoint is read once over all ranks, not once per rank; a rank holds
    its pieces of a group of tensors (PARTITION_READ_BYTES) beside its partitions. Collective: every rank
    calls it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from megacore.checkpoint.safe_load import load_dcp
    from megacore.parallel.deepspeed import partition_from_rows, rows_of

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    groups, group_bytes = [[]], 0  # consecutive parameters whose pieces add up to PARTITION_READ_BYTES
    for name, p in model.named_parameters():
        if group_bytes >= PARTITION_READ_BYTES:
            groups.append([])
            group_bytes = 0
        groups[-1].append((name, p))
        group_bytes += 4 * p.ds_numel // world
    for group in groups:
        pieces = {}
        for name, p in group:
            shape = tuple(p.ds_shape)
            first, count = rows_of(rank, shape[0], world)
            pieces[name] = DTensor.from_local(torch.empty((count, *shape[1:])), mesh, [Shard(0)], run_check=False,
                                              shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())
        load_dcp({"model": pieces}, ckpt)
        for name, p in group:
            partition_from_rows(p, pieces[name].to_local())


class TrainedModel(NamedTuple):
    """A trained model for one process (eval, generate, export): where it came from, by name."""

    model: Llama  # in eval mode
    tokenizer: Tokenizer
    config: Config  # the run's config (a published model's: its model section, defaults elsewhere)
    source: Location  # the checkpoint directory, or the Hugging Face directory


def load_trained(path: str | Location, device: str = "cpu") -> TrainedModel:
    """Model (eval mode), tokenizer and config from a run directory, a checkpoint or a checkpoint.dir
    (local or a URL: its newest good checkpoint, verified once), or from a published model's Hugging Face
    directory (its config.json defines the model)."""
    cfg, tokenizer, source = trained_config(path)
    model = empty_model(cfg, device)
    if is_published(source):
        from megacore.checkpoint.hf import load_hf_into

        load_hf_into(model, source)
    else:
        load_model_weights(model, source)
    return TrainedModel(model.eval(), tokenizer, cfg, source)


class TrainedWeights(NamedTuple):
    """A trained model's weights to stream tensor by tensor (export, consolidate), never loaded whole."""

    weights: Weights
    tokenizer: Tokenizer
    config: Config  # as in TrainedModel
    source: Location


def trained_config(path: str | Location, verify: bool = True) -> tuple[Config, Tokenizer, Location]:
    """(config, tokenizer, source) of a trained model, its weights left where they are: a run directory,
    checkpoint or checkpoint.dir (its newest good checkpoint; `verify` False: a checkpoint already chosen
    and verified, or only its config is wanted), or a published model's directory (its config.json defines
    the model section, the rest is the defaults)."""
    if is_published(path):
        from megacore.checkpoint.hf import read_hf_config
        from megacore.checkpoint.hf_config import model_config_from_hf

        local, cfg = local_published(path), Config()
        cfg.model = model_config_from_hf(read_hf_config(local), cfg.model, local)
        return cfg, load_tokenizer(local), local
    if verify:
        ckpt = resolve_checkpoint(path)
    else:
        ckpt = location(path) if is_checkpoint(path) else latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"no complete checkpoint in {path}")
    run_files = checkpoint_run_files(ckpt)
    return load_run_config(run_files), load_tokenizer(run_files), ckpt


def open_trained(path: str | Location) -> TrainedWeights:
    """What `load_trained` gives, with the weights left where they are, to stream."""
    from megacore.checkpoint.hf import PublishedWeights

    cfg, tokenizer, source = trained_config(path)
    weights = PublishedWeights(source, cfg.model) if is_published(source) else checkpoint_weights(source)
    return TrainedWeights(weights, tokenizer, cfg, source)


def empty_model(cfg: Config, device: str | torch.device = "cpu") -> Llama:
    """The model with allocated, uninitialised weights (they are about to be loaded: no init work)."""
    with torch.device("meta"):
        model = Llama(cfg.model)
    model.to_empty(device=device)
    model.init_buffers()
    return model


def consolidate(source: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a checkpoint of either backend as a weights-only, single-file-set DCP checkpoint in a new run
    directory OUT (config with backend=torch, tokenizer): eval, generate, export-hf and train.init_from
    read it like any torch-backend run. Streamed tensor by tensor (megacore/checkpoint/streaming.py): the
    memory of a tensor, not of the model. `dtype` bfloat16 halves it; loads give fp32 weights again.
    Returns the new checkpoint directory."""
    from megacore.checkpoint.streaming import save_dcp_streaming

    ckpt = resolve_checkpoint(source)
    run_dir, out = checkpoint_run_files(ckpt), Path(out)
    if list_checkpoints(out):
        raise FileExistsError(f"{out} already has checkpoints; choose a new directory")
    cfg = load_run_config(run_dir)
    with torch.device("meta"):
        names = Llama(cfg.model).state_dict()
    cfg.parallel = type(cfg.parallel)()  # a plain torch-backend layout; any layout can load it
    cfg.checkpoint.dir = ""  # (OUT's own checkpoints/, not the source run's checkpoint.dir)
    meta = dataclasses.replace(read_meta(ckpt), weights_only=True, config=cfg.to_dict(),
                               consolidated_from=str(ckpt.resolve() if isinstance(ckpt, Path) else ckpt))
    final = out / CHECKPOINTS / ckpt.name
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_config(cfg, out / CONFIG)
    copy_tokenizer(load_tokenizer(run_dir), out)
    (tmp / RUN_FILES).mkdir()
    save_config(cfg, tmp / RUN_FILES / CONFIG)
    copy_tokenizer(load_tokenizer(run_dir), tmp / RUN_FILES)
    save_dcp_streaming(names, checkpoint_weights(ckpt).read, tmp, dtype)
    commit_directory(tmp, final, meta)
    return final
