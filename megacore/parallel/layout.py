"""The parallel layout of a run: the pp x dp_replicate x dp_shard x cp x tp mesh for one world size.

`Layout.resolve(cfg, world_size)` is the one place that checks a config against a world size: the CLI
calls it before any process starts (so a bad layout exits 2 at once), every rank calls it again at
start, and `megacore estimate` calls it for any N without starting anything. The result is frozen:
the degrees, the data-parallel size, the micro-batches per rank and step, and each rank's coordinates
in the row-major mesh (rank = (((pp * R + dp_replicate) * S + dp_shard) * C + cp) * T + tp).

Context-parallel ranks (cp) read the same batch and each holds a share of every sequence; FSDP shards
parameters over dp_shard x cp (the flattened mesh dimension "dp_shard_cp"), so cp ranks share the
optimizer's work too, as in torchtitan.

Expert parallelism (ep) splits dp_shard: ep consecutive dp_shard ranks hold different experts of each MoE
layer and exchange tokens; the mesh is then built with dp_shard as (efsdp, ep), flattened back into
dp_shard for everything else, and the experts are FSDP-sharded over efsdp (and dp_replicate) only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from megacore.config import Config
from megacore.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
FSDP_SHARD_DIM = "dp_shard_cp"  # dp_shard x cp, flattened
EXPERT_DIMS = ("efsdp", "ep")  # dp_shard = efsdp x ep under expert parallelism


@dataclass(frozen=True)
class Layout:
    """Defaults describe one process with one micro-batch per step (evaluation, generation)."""

    world_size: int = 1
    backend: str = "torch"
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1  # expert parallelism, within dp_shard
    pp_schedule: str = "1f1b"
    stages_per_rank: int = 1
    # Micro-batches per optimizer step on each data-parallel rank: gradient-accumulation steps, or the
    # pipeline schedule's micro-batches when pp > 1.
    n_micro: int = 1
    # parallel.fsdp_reshard=always: FSDP units reshard after every forward and backward and
    # reduce-scatter gradients on every micro-batch (megacore/parallel/fsdp.py).
    fsdp_lean: bool = False

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks (replicas x shards): the loader's slices of the global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_size(self) -> int:
        """Ranks that FSDP's gradient reduction averages over: dp_replicate x dp_shard x cp (1: no FSDP)."""
        return self.dp_size * self.cp

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def coordinates(self, rank: int) -> dict[str, int]:
        """Rank -> its index along each mesh dimension (and along dp_shard_cp, the flattened dp_shard x cp)."""
        coords = {}
        for dim in reversed(MESH_DIMS):
            size = getattr(self, dim)
            coords[dim] = rank % size
            rank //= size
        coords[FSDP_SHARD_DIM] = coords["dp_shard"] * self.cp + coords["cp"]
        coords["efsdp"], coords["ep"] = divmod(coords["dp_shard"], self.ep)
        return coords

    def dp_rank(self, rank: int) -> int:
        """Which slice of the global batch `rank` reads (ranks that differ only in pp, cp or tp read the same)."""
        c = self.coordinates(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def build_mesh(self, device_type: str):
        """The device mesh (needs the process group); its dimension names are MESH_DIMS, and dp_shard x cp
        is flattened into FSDP_SHARD_DIM (what FSDP shards over)."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.ep == 1:
            mesh = init_device_mesh(device_type, tuple(getattr(self, d) for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
        else:  # dp_shard split into (efsdp, ep), then flattened back (cp is 1: Layout.resolve)
            dims = ("pp", "dp_replicate", *EXPERT_DIMS, "cp", "tp")
            sizes = (self.pp, self.dp_replicate, self.dp_shard // self.ep, self.ep, self.cp, self.tp)
            mesh = init_device_mesh(device_type, sizes, mesh_dim_names=dims)
            mesh[EXPERT_DIMS]._flatten("dp_shard")
        if self.cp > 1:
            mesh["dp_shard", "cp"]._flatten(FSDP_SHARD_DIM)
        return mesh

    def expert_fsdp_mesh(self, mesh):
        """The mesh FSDP shards the experts over under expert parallelism: efsdp, with dp_replicate first."""
        return mesh["dp_replicate", "efsdp"] if self.dp_replicate > 1 else mesh["efsdp"]

    def fsdp_mesh(self, mesh):
        """The mesh FSDP shards over: dp_shard (x cp), with dp_replicate first for HSDP."""
        shard = FSDP_SHARD_DIM if self.cp > 1 else "dp_shard"
        with warnings.catch_warnings():
            # torch 2.13 slices a flattened dimension from the root mesh as before, warning that a later
            # release may not; the mesh it returns is the one FSDP needs.
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")
            return mesh["dp_replicate", shard] if self.dp_replicate > 1 else mesh[shard]

    def describe(self) -> str:
        cp = f" x cp {self.cp}" if self.cp > 1 else ""
        ep = f" (ep {self.ep})" if self.ep > 1 else ""
        return f"pp {self.pp} x dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard}{ep}{cp} x tp {self.tp}"

    @classmethod
    def resolve(cls, cfg: Config, world_size: int) -> Layout:
        """The layout of `cfg.parallel` on `world_size` ranks; ConfigError naming the keys if the model, batch
        or sequence cannot be split that way (rules between other sections: megacore/preflight.py)."""
        par, m, train = cfg.parallel, cfg.model, cfg.train
        others = par.dp_replicate * par.tp * par.pp * par.cp
        dp_shard = par.dp_shard
        with_cp = par.cp > 1  # (cp is named in messages only where it is used)
        if dp_shard == -1:
            if world_size % others:
                raise ConfigError(f"world size {world_size} is not divisible by parallel.dp_replicate="
                                  f"{par.dp_replicate} x parallel.tp={par.tp} x parallel.pp={par.pp}"
                                  + (f" x parallel.cp={par.cp}" if with_cp else ""))
            dp_shard = world_size // others
        if others * dp_shard != world_size:
            raise ConfigError(f"parallel.pp={par.pp} x dp_replicate={par.dp_replicate} x dp_shard={dp_shard} x "
                              + (f"cp={par.cp} x " if with_cp else "")
                              + f"tp={par.tp} = {others * dp_shard}, but the world size is {world_size}")
        if m.n_heads % par.tp or m.n_kv_heads % par.tp:
            raise ConfigError(f"parallel.tp={par.tp} must divide model.n_heads={m.n_heads} and "
                              f"model.n_kv_heads={m.n_kv_heads}")
        if par.ep > 1:
            if not m.moe:
                raise ConfigError(f"parallel.ep={par.ep} needs a mixture of experts (model.n_experts > 0)")
            if dp_shard % par.ep or m.n_experts % par.ep:
                raise ConfigError(f"parallel.ep={par.ep} must divide parallel.dp_shard={dp_shard} (expert parallelism "
                                  f"splits the sharded data-parallel ranks) and model.n_experts={m.n_experts}")
            if par.cp > 1 or par.tp > 1:
                raise ConfigError(f"parallel.ep={par.ep} with parallel.cp={par.cp} and parallel.tp={par.tp}: expert "
                                  f"parallelism composes with dp_shard, dp_replicate and pp only (cp and tp must be 1)")
        seq = cfg.data.seq_len
        if par.cp > 1 and (seq % (2 * par.cp) or (seq // par.cp) % par.tp):
            raise ConfigError(f"data.seq_len={seq} must be divisible by 2 x parallel.cp={par.cp} (context parallelism "
                              f"cuts each sequence into 2 x cp chunks), and each cp rank's share of it by "
                              f"parallel.tp={par.tp} (sequence parallelism splits that share)")
        if cfg.data.seq_len % par.tp:
            raise ConfigError(f"parallel.tp={par.tp} must divide data.seq_len={cfg.data.seq_len} "
                              f"(sequence parallelism splits the sequence)")
        stages_per_rank = par.pp_stages_per_rank or (2 if par.interleaved else 1)
        stages = par.pp * stages_per_rank
        if par.pp > 1 and stages > m.n_layers:
            raise ConfigError(f"parallel.pp={par.pp} x {stages_per_rank} stage(s) per rank = {stages} pipeline "
                              f"stages, more than model.n_layers={m.n_layers}")
        dp_size = par.dp_replicate * dp_shard
        per_step = train.micro_batch_size * dp_size
        if train.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size={train.global_batch_size} is not divisible by "
                              f"train.micro_batch_size={train.micro_batch_size} x {dp_size} data-parallel ranks")
        n_micro = train.global_batch_size // per_step
        if par.pp > 1 and par.interleaved and n_micro < par.pp:
            raise ConfigError(
                f"parallel.pp_schedule={par.pp_schedule} needs at least parallel.pp={par.pp} micro-batches per step; "
                f"train.global_batch_size={train.global_batch_size} / (micro_batch_size="
                f"{train.micro_batch_size} x {dp_size} dp ranks) gives {n_micro}")
        return cls(world_size=world_size, backend=par.backend, pp=par.pp, dp_replicate=par.dp_replicate,
                   dp_shard=dp_shard, cp=par.cp, tp=par.tp, ep=par.ep, pp_schedule=par.pp_schedule,
                   stages_per_rank=stages_per_rank,
                   n_micro=n_micro, fsdp_lean=par.fsdp_reshard == "always")
