"""The run configuration's schema: one typed dataclass per section, each validating its own values.

`load_config("configs/tiny.yaml", ["optim.lr=3e-4"])` returns a validated `Config` (the generic YAML
reading is megacore/config/loader.py). Unknown keys, wrong types and impossible values raise
`ConfigError`, whose message names the dotted key; the CLI turns it into exit status 2 before any
process is started. What depends on the world size (degrees, micro-batches) is checked by
`megacore.parallel.layout.Layout.resolve`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_pipeline.durable import write_text_atomic
from megacore.config.health import HealthConfig
from megacore.config.loader import apply_override, build_dataclass, read_mapping
from megacore.errors import ConfigError


@dataclass
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    # 0 means: take the vocabulary size from the tokenizer of `data.dir`.
    vocab_size: int = 0
    # SwiGLU hidden size is 8/3 * dim rounded up to a multiple of this (as in Llama), unless ffn_dim
    # gives it (Llama 3 8B: 14336; 70B: 28672).
    ffn_multiple_of: int = 64
    ffn_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 1024
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Per-head size; 0: dim / n_heads (Qwen3 sets it explicitly).
    head_dim: int = 0
    # Bias on the query, key and value projections (Qwen2), and RMSNorm over each head of the queries and
    # keys before RoPE (Qwen3).
    qkv_bias: bool = False
    qk_norm: bool = False
    # RoPE frequency scaling for long context: none, linear (positions / factor) or llama3 (Llama 3.1's
    # wavelength-dependent scaling with its low/high frequency factors and original context length).
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    # The Hugging Face family that export-hf writes (and that init_from=HF_DIR read): its architecture
    # class and config fields.
    family: Literal["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"] = "llama"
    # Confine attention to each packed document (positions restart after EOS), as in pretraining
    # on packed data without cross-document contamination.
    document_masking: bool = False
    # Dropout on attention probabilities and on each block's attention and MLP outputs, in training only
    # (0: none, as in modern pretraining; 0.05-0.1 helps small fine-tuning sets).
    dropout: float = 0.0
    # Mixture of experts (megacore/model/moe.py); n_experts 0: a dense model. An MoE layer's router sends
    # each token to n_active_experts of n_experts SwiGLU experts of width moe_ffn_dim (0: ffn_dim's rule).
    # Layer i is an MoE layer when (i + 1) % moe_every == 0 and i is not in moe_dense_layers (Qwen3-MoE's
    # decoder_sparse_step and mlp_only_layers; dense layers keep ffn_dim).
    n_experts: int = 0
    n_active_experts: int = 2
    moe_ffn_dim: int = 0
    moe_every: int = 1
    moe_dense_layers: list[int] = field(default_factory=list)
    # Renormalise the chosen experts' weights to sum to 1 (Qwen3-MoE's norm_topk_prob; Mixtral always does).
    moe_norm_topk: bool = True
    # Load balancing: the auxiliary loss, with transformers' router_aux_loss_coef meaning (0: off), and
    # auxiliary-loss-free balancing: a per-expert bias added to the scores for choosing experts only,
    # moved by this much towards the mean load after each step (DeepSeek-V3's update speed; 0: off).
    moe_aux_loss_coef: float = 0.0
    moe_bias_update_rate: float = 0.0

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    @property
    def ffn_width(self) -> int:
        """The dense SwiGLU's hidden size: ffn_dim, or 8/3 * dim rounded up to ffn_multiple_of."""
        if self.ffn_dim:
            return self.ffn_dim
        return self.ffn_multiple_of * math.ceil(int(8 * self.dim / 3) / self.ffn_multiple_of)

    @property
    def expert_width(self) -> int:
        """Each expert's SwiGLU hidden size: moe_ffn_dim, or the dense rule."""
        return self.moe_ffn_dim or self.ffn_width

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe and (layer + 1) % self.moe_every == 0 and layer not in self.moe_dense_layers

    @property
    def head_size(self) -> int:
        """Per-head size: model.head_dim, or dim / n_heads."""
        return self.head_dim or self.dim // self.n_heads

    def validate(self) -> None:
        _positive(self, "model", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_multiple_of", "max_seq_len")
        if self.dim % self.n_heads and not self.head_dim:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads} (or set "
                              f"model.head_dim)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim < 0 or self.head_dim % 2 or (not self.head_dim and (self.dim // self.n_heads) % 2):
            raise ConfigError(f"model.head_dim={self.head_dim} (0: dim / n_heads = {self.dim // self.n_heads}) must be "
                              f"even for RoPE")
        if self.rope_scaling != "none" and self.rope_scaling_factor <= 0:
            raise ConfigError(f"model.rope_scaling_factor must be > 0, got {self.rope_scaling_factor}")
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError(f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                              f"model.rope_low_freq_factor={self.rope_low_freq_factor}")
        if self.ffn_dim < 0:
            raise ConfigError(f"model.ffn_dim must be >= 0 (0 = 8/3 * dim rounded), got {self.ffn_dim}")
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size must be >= 0 (0 = from tokenizer), got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise ConfigError("model.norm_eps, model.rope_theta and model.init_std must be > 0")
        self._validate_moe()

    def _validate_moe(self) -> None:
        if self.n_experts < 0 or self.moe_ffn_dim < 0:
            raise ConfigError(f"model.n_experts={self.n_experts} and model.moe_ffn_dim={self.moe_ffn_dim} must be >= 0")
        if self.family in ("qwen3_moe", "mixtral") and not self.moe:
            raise ConfigError(f"model.family={self.family} is a mixture of experts: set model.n_experts (> 0)")
        if not self.moe:
            return
        if self.family not in ("qwen3_moe", "mixtral"):
            raise ConfigError(f"model.n_experts={self.n_experts} with model.family={self.family}: a mixture of experts "
                              f"is a qwen3_moe (q/k norms: model.qk_norm=true) or mixtral model (the family it "
                              f"exports as); set model.family")
        if not 1 <= self.n_active_experts <= self.n_experts:
            raise ConfigError(f"model.n_active_experts={self.n_active_experts} must be in [1, model.n_experts="
                              f"{self.n_experts}]")
        if self.moe_every < 1:
            raise ConfigError(f"model.moe_every must be >= 1, got {self.moe_every}")
        bad = [i for i in self.moe_dense_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(f"model.moe_dense_layers={self.moe_dense_layers}: {bad} not layers of model.n_layers="
                              f"{self.n_layers}")
        if not any(self.is_moe_layer(i) for i in range(self.n_layers)):
            raise ConfigError(f"model.n_experts={self.n_experts} but no layer is an MoE layer (model.moe_every="
                              f"{self.moe_every}, model.moe_dense_layers={self.moe_dense_layers}, model.n_layers="
                              f"{self.n_layers})")
        if self.moe_aux_loss_coef < 0 or self.moe_bias_update_rate < 0:
            raise ConfigError(f"model.moe_aux_loss_coef={self.moe_aux_loss_coef} and model.moe_bias_update_rate="
                              f"{self.moe_bias_update_rate} must be >= 0")
        if self.family == "mixtral" and (not self.moe_norm_topk or self.moe_every != 1 or self.moe_dense_layers):
            raise ConfigError(f"model.family=mixtral has every layer an MoE layer with renormalised weights, but "
                              f"model.moe_norm_topk={self.moe_norm_topk}, model.moe_every={self.moe_every}, "
                              f"model.moe_dense_layers={self.moe_dense_layers} (need true, 1, [])")


@dataclass
class DataConfig:
    # Where `megacore data prepare` writes shards, manifest and tokenizer, and where training reads them.
    dir: str = "data/shakespeare"
    # fsspec URLs or globs of raw text (.txt, .jsonl, .parquet, .arrow; .gz/.bz2/.xz/.zst), chained URLs too.
    sources: list[str] = field(default_factory=list)
    # For .txt files: one document per blank-line separated paragraph, or per file.
    text_unit: Literal["paragraph", "file"] = "paragraph"
    # For .jsonl records and .parquet/.arrow tables: the field holding the text.
    text_field: str = "text"
    # text: documents for pretraining. chat: JSONL of {prompt, response} or {messages: [{role, content}]},
    # rendered with the chat template; only assistant tokens are trained (data_pipeline/chat.py).
    format: Literal["text", "chat"] = "text"
    # Use this tokenizer (a prepared data directory or a tokenizer.model) instead of training one: a
    # fine-tuning set must share the pretrained model's tokenizer.
    tokenizer_from: str = ""
    # Cleaning: Unicode normal form, length filters (characters), exact de-duplication, UTF-8 policy.
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    min_doc_chars: int = 1
    max_doc_chars: int = 1_000_000
    dedup: bool = True
    # Invalid UTF-8 is replaced (and the file named in the log) unless this is set; then it is an error.
    strict_utf8: bool = False
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 2048
    # Share of the sample's characters that get their own pieces (sentencepiece's character_coverage);
    # the rest are spelled in UTF-8 bytes (byte fallback), so decoding stays exact. null (the default):
    # sentencepiece's 0.9995, unless those characters leave the vocabulary no room (CJK text with a small
    # vocabulary): then the most frequent characters that fill half of it (`data prepare` says which).
    character_coverage: float | None = None
    # The tokenizer trains on the first this-many MB of cleaned training text.
    tokenizer_sample_mb: float = 256.0
    val_fraction: float = 0.05
    # Text per shard (MB of UTF-8); shards are the unit of parallel tokenization and of resumed preparation.
    shard_mb: float = 64.0
    # Tokenizer worker processes for `data prepare` (0: one per CPU).
    prepare_workers: int = 0
    seq_len: int = 256
    # Background threads that read batches ahead of training (0: read in the loop, fastest from page
    # cache; threads pay off when shards sit on slow or remote storage).
    num_workers: int = 0
    # Training data as a weighted mixture of prepared directories, "DIR:WEIGHT" each; empty: `dir` alone.
    # Validation and the tokenizer still come from `dir`; every directory must share its tokenizer.
    mixture: list[str] = field(default_factory=list)
    # Shards of a data directory in object storage (data.dir=s3://...) are downloaded whole, verified,
    # into this local cache (default: $MEGACORE_CACHE or ~/.cache/megacore, under shards/), which keeps
    # at most cache_gb, least recently used first out (data_pipeline/shard_cache.py).
    cache_dir: str = ""
    cache_gb: float = 64.0

    def validate(self) -> None:
        _positive(self, "data", "vocab_size", "seq_len", "max_doc_chars", "shard_mb", "tokenizer_sample_mb")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.vocab_size < 260:
            # 256 byte-fallback pieces plus the special tokens must fit.
            raise ConfigError(f"data.vocab_size must be at least 260 (byte fallback), got {self.vocab_size}")
        for name in ("min_doc_chars", "prepare_workers", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.character_coverage is not None and not 0.0 < self.character_coverage <= 1.0:
            raise ConfigError(f"data.character_coverage must be in (0, 1], got {self.character_coverage}")
        if self.cache_gb <= 0:
            raise ConfigError(f"data.cache_gb must be > 0, got {self.cache_gb}")
        # data.dir and the mixture may be object-store URLs (prepared there, read through the cache).
        self.mixture_weights()
        _local_path("data.tokenizer_from", self.tokenizer_from)
        _local_path("data.cache_dir", self.cache_dir)

    def mixture_weights(self) -> list[tuple[str, float]]:
        """[(dir, weight)] of the training mixture; weights need not sum to 1."""
        out = []
        for i, item in enumerate(self.mixture):
            path, sep, weight = item.rpartition(":")
            try:
                value = float(weight)
            except ValueError:
                value = -1.0
            if not sep or not path or not value > 0:
                raise ConfigError(f"data.mixture[{i}]={item!r} is not of the form DIR:WEIGHT with WEIGHT > 0")
            out.append((path, value))
        return out


@dataclass
class ParallelConfig:
    # torch: torch.distributed's FSDP2/HSDP, tensor and pipeline parallelism on one device mesh.
    # deepspeed: DeepSpeed ZeRO data parallelism over all ranks (same model, data, loop, checkpoints).
    backend: Literal["torch", "deepspeed"] = "torch"
    # DeepSpeed only: ZeRO stage (1 optimizer state, 2 + gradients, 3 + parameters partitioned), and
    # CPU offload of the optimizer (DeepSpeedCPUAdam) and, with stage 3, of the parameters.
    zero_stage: Literal[1, 2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    # The device mesh is pp x dp_replicate x dp_shard x cp x tp; its product must be the world size.
    # dp_shard=-1 takes whatever the others leave.
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    # Context parallelism: each sequence split over cp ranks (2*cp chunks, head-tail), keys and values
    # all-gathered in attention; cp ranks read the same batch and FSDP shards over dp_shard x cp.
    # data.seq_len must be divisible by 2 x cp x tp (megacore/parallel/context_parallel.py).
    cp: int = 1
    # cp > 1: keep only each rank's keys and values for the backward (gathered again there and the
    # attention recomputed) instead of the whole sequence's: less memory per layer, one more all-gather.
    cp_regather_kv: bool = False
    # Expert parallelism (mixtures of experts): each MoE layer's experts split over ep ranks of dp_shard,
    # tokens exchanged with all-to-all (megacore/parallel/expert_parallel.py); ep must divide dp_shard and
    # model.n_experts.
    ep: int = 1
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb"] = "1f1b"
    # Pipeline stages held by each pp rank; interleaved schedules need 2 or more.
    pp_stages_per_rank: int = 0  # 0: 1 for gpipe/1f1b, 2 for interleaved schedules
    # Activation checkpointing: none, full (recompute each block), selective (keep matmul outputs).
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # torch.compile each transformer block and the output head's chunked loss. auto: on CUDA, not on
    # CPU (megacore/device.py).
    compile: Literal["auto", True, False] = "auto"
    # FSDP memory policy. default: reshard weights after forward (kept gathered through a pipeline
    # step), reduce-scatter gradients once per step. always: reshard after every forward and backward
    # and reduce-scatter on every micro-batch: memory of the shard, more communication.
    fsdp_reshard: Literal["default", "always"] = "default"

    def validate(self) -> None:
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"parallel.dp_shard must be -1 (the rest) or >= 1, got {self.dp_shard}")
        _positive(self, "parallel", "dp_replicate", "tp", "pp", "cp", "ep")
        if self.cp_regather_kv and self.cp == 1:
            raise ConfigError("parallel.cp_regather_kv=true needs parallel.cp > 1 (there is nothing to gather)")
        if self.pp_stages_per_rank < 0:
            raise ConfigError(f"parallel.pp_stages_per_rank must be >= 0, got {self.pp_stages_per_rank}")
        if self.interleaved and self.pp_stages_per_rank == 1:
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule} needs parallel.pp_stages_per_rank >= 2")
        if not self.interleaved and self.pp_stages_per_rank > 1:
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule} runs one stage per rank; "
                              f"parallel.pp_stages_per_rank={self.pp_stages_per_rank} needs an interleaved schedule")
        if self.backend == "deepspeed":
            # What DeepSpeed cannot do here, refused in our terms (README: support matrix).
            for name, why in (("tp", "DeepSpeed AutoTP needs an accelerator; use backend=torch for tensor parallel"),
                              ("pp", "DeepSpeed's pipeline engine needs a PipelineModule; use backend=torch"),
                              ("dp_replicate", "ZeRO shards over all ranks; use backend=torch for HSDP"),
                              ("cp", "context parallelism is applied to the torch backend's mesh; use backend=torch"),
                              ("ep", "expert parallelism is applied to the torch backend's mesh; use backend=torch")):
                if getattr(self, name) != 1:
                    raise ConfigError(f"parallel.{name}={getattr(self, name)} with parallel.backend=deepspeed: {why}")
            if self.compile is True or self.activation_checkpointing != "none":
                raise ConfigError("parallel.compile and parallel.activation_checkpointing are backend=torch features "
                                  "(not wired into DeepSpeed's engine)")
        elif self.offload_optimizer or self.offload_params:
            raise ConfigError("parallel.offload_optimizer / offload_params need parallel.backend=deepspeed")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"parallel.offload_params needs parallel.zero_stage=3, got {self.zero_stage}")

    @property
    def interleaved(self) -> bool:
        return self.pp_schedule.startswith("interleaved")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    # The learning-rate schedule after the linear warmup (megacore/train/optim.py): cosine to lr *
    # min_lr_ratio over the rest of train.steps; wsd (warmup-stable-decay): constant lr, then a decay to lr *
    # min_lr_ratio over the last decay steps, so a run can be extended (more train.steps on resume) without
    # changing its past, and annealed from any stable-phase checkpoint; constant.
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    # The cosine schedule decays to lr * min_lr_ratio (and wsd's decay).
    min_lr_ratio: float = 0.1
    # wsd: the decay's length: decay_steps if > 0, else decay_fraction of train.steps; its shape: linear, or
    # 1-sqrt (lr falls as 1 - sqrt(progress): Hägele et al., 2024).
    decay_steps: int = 0
    decay_fraction: float = 0.2
    decay_shape: Literal["linear", "1-sqrt"] = "linear"
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Clip the global gradient norm to this; 0 disables clipping.
    grad_clip: float = 1.0

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eps", "decay_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    # Length of the schedule in optimizer steps.
    steps: int = 300
    # End this invocation after this step (a planned stop; the schedule still spans `steps`).
    stop_after: int | None = None
    # Sequences per optimizer step across all ranks, and per forward pass on one rank.
    global_batch_size: int = 16
    micro_batch_size: int = 8
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 on GPUs that have it, fp32 on CPUs (no bf16 units here: bf16 is ~90x slower).
    mixed_precision: Literal["auto", "fp32", "bf16"] = "auto"
    # TF32 for fp32 matmuls on CUDA (no effect on CPU).
    tf32: bool = True
    # float8 training of the block linears through torchao (optional extra `megacore[float8]`), with
    # FSDP's float8 all-gather; needs a GPU with compute capability >= 8.9.
    float8: bool = False
    # Python's garbage collector runs every this many steps on every rank, and never in between (a
    # collection at a random point stalls one rank, and every collective waits for it); 0: Python decides.
    gc_every: int = 50
    eval_every: int = 100
    eval_batches: int = 8
    # More evaluation sets besides data.dir's val split, "NAME=DIR" (its val split) or "NAME=DIR:SPLIT",
    # logged as kind val_NAME; they must share data.dir's tokenizer.
    eval_sets: list[str] = field(default_factory=list)
    # Downstream tasks scored at every evaluation, "NAME=FILE.jsonl" each (megacore/eval/tasks.py:
    # multiple choice or a target, as lm-evaluation-harness scores them), split over data-parallel ranks.
    eval_tasks: list[str] = field(default_factory=list)
    # Stop (with a checkpoint) when the val loss has not improved for this many evaluations; 0: never.
    early_stop_patience: int = 0
    # Initial weights for a fresh run: a Hugging Face Llama directory or a megacore run/checkpoint
    # directory (weights only; optimizer and schedule start fresh). Ignored when resuming.
    init_from: str = ""
    # Peak TFLOP/s per rank for MFU; 0: the GPU's dense datasheet peak (megacore/device.py), or on a
    # CPU (or an unknown GPU) a matmul measured at start.
    peak_tflops: float = 0.0

    def validate(self) -> None:
        _positive(self, "train", "steps", "global_batch_size", "micro_batch_size", "eval_every", "eval_batches")
        if self.stop_after is not None and not 0 < self.stop_after <= self.steps:
            raise ConfigError(f"train.stop_after must be in [1, train.steps={self.steps}], got {self.stop_after}")
        if self.early_stop_patience < 0:
            raise ConfigError(f"train.early_stop_patience must be >= 0, got {self.early_stop_patience}")
        if self.gc_every < 0:
            raise ConfigError(f"train.gc_every must be >= 0 (0: Python decides), got {self.gc_every}")
        if self.float8:
            import importlib.util

            if importlib.util.find_spec("torchao") is None:
                raise ConfigError("train.float8=true needs torchao: pip install 'megacore[float8]'")
        # The run directory (logs, metrics, health) is local; checkpoint.dir, init_from and eval sets may
        # be object-store URLs.
        _local_path("train.run_dir", self.run_dir)
        self.named_eval_sets()
        names = [item.partition("=")[0] for item in self.eval_tasks]
        for i, item in enumerate(self.eval_tasks):
            name, sep, path = item.partition("=")
            if not sep or not name or not path or "/" in name or names.count(name) > 1:
                raise ConfigError(f"train.eval_tasks[{i}]={item!r} is not of the form NAME=FILE.jsonl with a NAME of "
                                  f"its own")

    def named_eval_sets(self) -> list[tuple[str, str, str]]:
        """[(name, dir, split)] of train.eval_sets."""
        out = []
        for i, item in enumerate(self.eval_sets):
            name, sep, where = item.partition("=")
            if not sep or not name.isidentifier() or not where:
                raise ConfigError(f"train.eval_sets[{i}]={item!r} is not of the form NAME=DIR or NAME=DIR:SPLIT")
            directory, _, split = where.partition(":")
            out.append((name, directory, split or "val"))
        return out


@dataclass
class CheckpointConfig:
    # false: no checkpoint at all, not even at the end (benchmarks, smoke tests; a requeued run then
    # starts over).
    enabled: bool = True
    every: int = 100
    # Keep the newest `keep_last` checkpoints (0 keeps all), and also every step divisible by keep_every.
    keep_last: int = 2
    keep_every: int = 0
    # Write checkpoints in the background (staged in memory first) while training continues.
    async_save: bool = False
    # Where committed checkpoints live: a local directory or an object-store URL (s3://bucket/run,
    # gs://, az://); empty: RUN_DIR/checkpoints. Each checkpoint carries the run's config and tokenizer,
    # so a node with an empty run directory resumes from here (megacore/checkpoint/store.py).
    dir: str = ""

    def validate(self) -> None:
        _positive(self, "checkpoint", "every")
        for name in ("keep_last", "keep_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"checkpoint.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class LoggingConfig:
    log_every: int = 10
    # Weights & Biases from rank 0. auto: online when an API key is set and the server answers, offline
    # otherwise (sync later with the printed `wandb sync` command); disabled: metrics.jsonl only.
    wandb_mode: Literal["disabled", "auto", "online", "offline"] = "disabled"
    wandb_project: str = "megacore"
    wandb_entity: str = ""
    # Run name (default: the run directory's name); one W&B run per run directory, across resumes.
    wandb_name: str = ""
    wandb_tags: list[str] = field(default_factory=list)
    # torch.profiler over steps profile_start .. profile_start + profile_steps - 1 (0: off): a trace per
    # rank and a summary with the communication share in RUN_DIR/profile/ (megacore/monitor/profiling.py).
    profile_start: int = 0
    profile_steps: int = 3

    def validate(self) -> None:
        _positive(self, "logging", "log_every", "profile_steps")
        if self.profile_start < 0:
            raise ConfigError(f"logging.profile_start must be >= 0 (0: off), got {self.profile_start}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def validate(self) -> Config:
        if self.train.float8 and (self.parallel.backend != "torch" or self.parallel.tp > 1):
            raise ConfigError("train.float8=true needs parallel.backend=torch and parallel.tp=1 (float8 tensor-parallel "
                              "plans are not wired in)")
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        self.health.check_backend(self.parallel.backend)
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _local_path(key: str, value: str) -> None:
    """The run directory (logs appended line by line) and the shard cache are written in place: a URL would
    become a local directory named after its scheme (`./s3:/bucket/...`)."""
    if "://" in value:
        raise ConfigError(f"{key}={value} is a URL; {key} must be a path on a local or shared file system "
                          f"(checkpoints, prepared data and models may live in object storage: checkpoint.dir, "
                          f"data.dir, train.init_from)")


def _positive(section: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ConfigError(f"{prefix}.{name} must be > 0, got {value}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """A validated Config from a YAML file (or the defaults, for None) and dotted `key=value` overrides."""
    raw = read_mapping(path, "config file") if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return build_dataclass(Config, raw, "").validate()


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A new validated Config: `cfg` with dotted `key=value` overrides (cfg itself is not changed)."""
    raw = cfg.to_dict()
    for item in overrides:
        apply_override(raw, item)
    return build_dataclass(Config, raw, "").validate()


def save_config(cfg: Config, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
