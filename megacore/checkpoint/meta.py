"""A checkpoint's meta.json: what a checkpoint says about itself, read and written here only.

    version            META_VERSION (a file without it is version 1: every checkpoint before this field)
    step, time         the optimizer step it holds, when it was staged
    config             the run's resolved config (Config.to_dict()); its parallel.backend names the backend
    world_size         ranks that wrote it (DeepSpeed resumes only on as many; RNG streams per rank)
    loader             the data loader's position: data_pipeline's own format, upgraded by the loader itself
    tokenizer_sha256   the tokenizer it was trained with (init_from and eval refuse another)
    wandb_run_id       the W&B run it continues (megacore/monitor/wandb_run.py)
    health             run health's state: the window, the policy's memory, and "healthy"
    weights_only       a consolidated copy without optimizer state (`megacore checkpoints consolidate`),
    consolidated_from  and the checkpoint it was made from

Older versions are upgraded when read, one function per version (`_UPGRADES`); a newer version than this
code knows is refused with the way forward. Keys this code does not know are kept, and written back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from data_pipeline.durable import read_json_object
from data_pipeline.storage import exists, location
from megacore.errors import CheckpointError

META = "meta.json"
META_VERSION = 2


@dataclass(frozen=True)
class CheckpointMeta:
    step: int
    config: dict = field(default_factory=dict)
    world_size: int | None = None
    loader: dict = field(default_factory=dict)
    tokenizer_sha256: str | None = None
    wandb_run_id: str | None = None
    health: dict = field(default_factory=dict)
    time: float | None = None
    weights_only: bool = False
    consolidated_from: str | None = None
    version: int = META_VERSION
    extra: dict = field(default_factory=dict)  # keys of a later writer this code does not know: kept

    @property
    def backend(self) -> str:
        return self.config.get("parallel", {}).get("backend", "torch")

    @property
    def healthy(self) -> bool:
        """Written when no skipped step was pending (megacore/health/); checkpoints before run health are."""
        return self.health.get("healthy", True)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, raw: dict, where: str | Path = "meta.json") -> CheckpointMeta:
        """A meta.json's content at any version, upgraded to this one."""
        if not isinstance(raw, dict) or "step" not in raw:
            raise CheckpointError(f"{where}: not a checkpoint's meta.json (no step)")
        raw = dict(raw)
        version = raw.get("version", 1)
        if not isinstance(version, int) or version > META_VERSION:
            raise CheckpointError(f"{where}: meta.json version {version!r} is newer than this megacore reads "
                                  f"({META_VERSION}); upgrade megacore to load this checkpoint")
        for old in range(version, META_VERSION):
            raw = _UPGRADES[old](raw)
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in raw.items() if k in known},
                   extra={k: v for k, v in raw.items() if k not in known})


def _from_v1(raw: dict) -> dict:
    """Version 1 (no version field): keys were added over time; a missing one has its default (null
    world size, tokenizer and W&B id, no health state: healthy, not weights-only)."""
    return {**raw, "version": 2}


# _UPGRADES[v]: version v's dict -> version v + 1's.
_UPGRADES = {1: _from_v1}


def read_meta(path: str | Path) -> CheckpointMeta:
    """The metadata of checkpoint directory `path`."""
    meta_path = location(path) / META
    if not exists(meta_path):
        raise FileNotFoundError(f"not a checkpoint (no {META}): {path}")
    return CheckpointMeta.from_dict(read_json_object(meta_path, CheckpointError, "a checkpoint's meta.json"), meta_path)
