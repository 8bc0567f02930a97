"""What is checked before any process starts (by `megacore train` before it launches ranks, and again by
each rank): manifests and config only, so that the check imports no torch and costs no time. A prepared
directory that cannot serve the run is a DataError naming the config key and the directory."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from data_pipeline.shards import read_manifest
from data_pipeline.storage import is_url
from megacore.config import Config
from megacore.errors import ConfigError, DataError
from megacore.parallel.layout import Layout


def check_data(cfg: Config) -> None:
    """Before any process starts: every split the run reads exists and holds at least one window of
    data.seq_len + 1 tokens (a manifest read per directory; no shard is opened)."""
    window = cfg.data.seq_len + 1
    mixture = cfg.data.mixture_weights() or [(cfg.data.dir, 1.0)]
    reads = [("data.mixture" if cfg.data.mixture else "data.dir", d, "train") for d, _ in mixture]
    reads.append(("data.dir", cfg.data.dir, "val"))
    reads += [(f"train.eval_sets ({name})", d, split) for name, d, split in cfg.train.named_eval_sets()]
    for key, directory, split in reads:
        splits = read_manifest(directory)["splits"]
        if split not in splits:
            why = (" (prepared with data.val_fraction=0?); training evaluates on it every train.eval_every steps: "
                   "prepare with data.val_fraction > 0" if split == "val" else "")
            raise DataError(f"{key}={directory} has no {split!r} split (it has: {', '.join(splits)}){why}")
        tokens = splits[split]["tokens"]
        if tokens < window:
            raise DataError(f"{key}={directory}: the {split!r} split holds {tokens} tokens, fewer than one window of "
                            f"data.seq_len + 1 = {window}; add data, raise data.val_fraction, or lower data.seq_len")
    from megacore.eval.tasks import load_task, parse_task_arg

    for spec in cfg.train.eval_tasks:  # (every line checked, the file and line named)
        load_task(*parse_task_arg(spec, "train.eval_tasks"))


def check_storage(cfg: Config, resume: str = "none") -> None:
    """Before anything else reads them: every object-store location the run names answers with these
    credentials (one listing request each; StorageError naming the key and URL otherwise)."""
    from data_pipeline.storage import check_access

    named = [("data.dir", cfg.data.dir), ("checkpoint.dir", cfg.checkpoint.dir), ("train.init_from", cfg.train.init_from),
             ("--resume", resume if resume not in ("none", "auto") else "")]
    named += [(f"data.mixture[{i}]", d) for i, (d, _) in enumerate(cfg.data.mixture_weights())]
    named += [(f"train.eval_sets ({name})", d) for name, d, _ in cfg.train.named_eval_sets()]
    checked = set()
    for key, url in named:
        if is_url(url) and url not in checked:
            check_access(url, key, write=key == "checkpoint.dir")
            checked.add(url)


@dataclass(frozen=True)
class ResolvedRun:
    """A config resolved for one launch, and the layout it runs as: what every later step reads. The
    config is a copy (the caller's is never changed) and is not changed after `preflight`."""

    cfg: Config
    layout: Layout
    tokenizer_sha256: str | None  # of data.dir's tokenizer (None when planning without prepared data)


def preflight(cfg: Config, world_size: int, device=None, overrides: tuple[str, ...] | list[str] = (),
              data: bool = True) -> ResolvedRun:
    """The one resolution and check of a run, by `megacore train` before it starts processes and by
    `train()` on every rank: a Hugging Face train.init_from's model section (a model.* override in
    `overrides` that contradicts it is refused by name), model.vocab_size from the prepared data, the
    `auto` settings for `device` (a torch.device; None in the launcher, which imports no torch), the
    layout on `world_size` ranks and the rules between sections, and (data=True) the data each split
    needs. data=False plans without prepared data (vocab from data.vocab_size when not prepared)."""
    cfg = copy.deepcopy(cfg)
    _model_from_init_dir(cfg, list(overrides))
    if device is not None:
        from megacore.device import check_supported, resolve_auto

        resolve_auto(cfg, device)
        check_supported(cfg, device)
    layout = Layout.resolve(cfg, world_size)
    check_combinations(cfg)
    sha = _resolve_vocab(cfg, required=data)
    if data:
        check_data(cfg)
    return ResolvedRun(cfg, layout, sha)


def check_combinations(cfg: Config) -> None:
    """Rules between config sections that no one section can check by itself."""
    par, m = cfg.parallel, cfg.model
    if m.qk_norm and par.tp > 1:
        raise ConfigError("model.qk_norm (Qwen3) is not supported with parallel.tp > 1 yet; use FSDP or pipeline "
                          "parallelism")
    if m.tie_embeddings and (par.pp > 1 or par.tp > 1):
        raise ConfigError("model.tie_embeddings needs parallel.pp=1 and parallel.tp=1 (the embedding and the "
                          "output head are placed differently)")
    if par.backend == "deepspeed" and cfg.checkpoint.async_save:
        raise ConfigError("checkpoint.async_save is not supported with parallel.backend=deepspeed")
    if par.backend == "deepspeed" and is_url(cfg.checkpoint.dir):
        raise ConfigError(f"checkpoint.dir={cfg.checkpoint.dir} is in object storage, which parallel.backend=deepspeed "
                          f"cannot load from (its engine reads local files); use a local or shared checkpoint.dir, or "
                          f"parallel.backend=torch")
    if m.moe:
        # What mixtures of experts do not have yet, refused by name (README: support matrix).
        for clash, why in ((par.tp > 1, f"parallel.tp={par.tp}: tensor parallelism of experts is not implemented; "
                                        f"use parallel.ep and FSDP"),
                           (par.backend == "deepspeed", "parallel.backend=deepspeed: the experts' grouped GEMMs and "
                                                        "all-to-all are wired into the torch backend; use backend=torch"),
                           (cfg.train.float8, "train.float8: the experts' grouped GEMMs are not float8"),
                           (par.pp > 1 and m.moe_aux_loss_coef > 0,
                            f"parallel.pp={par.pp} and model.moe_aux_loss_coef={m.moe_aux_loss_coef}: the auxiliary loss "
                            f"couples every layer's routing (transformers' formula), and pipeline stages hold different "
                            f"layers; use model.moe_bias_update_rate (auxiliary-loss-free balancing) with pp")):
            if clash:
                raise ConfigError(f"model.n_experts={m.n_experts} (a mixture of experts) with {why}")


def _model_from_init_dir(cfg: Config, overrides: list[str]) -> None:
    """train.init_from=HF_DIR defines the model: its config.json replaces the model section (keeping the
    training-only fields), and a model.* override that contradicts it is refused by name."""
    from data_pipeline.storage import exists, location

    source = location(cfg.train.init_from) if cfg.train.init_from else None
    if source is None or not exists(source / "config.json"):  # (a directory in object storage too)
        return
    from megacore.checkpoint.hf import read_hf_config
    from megacore.checkpoint.hf_config import check_overrides, model_config_from_hf

    derived = model_config_from_hf(read_hf_config(source), cfg.model, source)
    check_overrides(derived, cfg.model, overrides, source)
    derived.validate()
    cfg.model = derived


def _resolve_vocab(cfg: Config, required: bool) -> str | None:
    """model.vocab_size from data.dir's tokenizer (refused when smaller); returns the tokenizer's sha256.
    Not required (planning): a directory not prepared yet gives the configured target, data.vocab_size."""
    try:
        tokenizer = read_manifest(cfg.data.dir)["tokenizer"]
    except FileNotFoundError:
        if required:
            raise
        cfg.model.vocab_size = cfg.model.vocab_size or cfg.data.vocab_size
        return None
    vocab = tokenizer["vocab_size"]
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab} "
                          f"in {cfg.data.dir}")
    return tokenizer["sha256"]
