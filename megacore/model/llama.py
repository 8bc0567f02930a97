"""Llama-style decoder: RMSNorm, rotary position embeddings, SwiGLU, grouped-query attention.

Plain PyTorch with no knowledge of parallelism: `megacore.parallel` shards it from the outside.
Attention reshapes with `view(b, t, -1, head_dim)` so that a tensor-parallel plan, which leaves each
rank a slice of the heads, needs no change here, and slices the rotary tables to its own sequence
length. A pipeline stage is this model with some layers removed and `tok_embeddings`, `norm` or
`output` set to None. RoPE uses the rotate-half layout of Hugging Face's `LlamaForCausalLM`, so
weights export without permutation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megacore.config import ModelConfig
from megacore.model.attention import DocumentMask, attention
from megacore.model.init import init_slice
from megacore.model.moe import MoE, moe_hidden_dim


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    return cfg.ffn_width


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with model.rope_scaling applied (as transformers'
    `linear` and `llama3` rope types compute them)."""
    d = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        context = cfg.rope_original_max_seq_len
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (beyond context / low) are slowed by the factor, short ones (below context / high)
        # kept, and the band between interpolated smoothly.
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_frequencies(cfg, device)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (batch or 1, >= seq, head_dim)."""
    t = x.shape[1]
    cos, sin = cos[:, :t].unsqueeze(2).to(x.dtype), sin[:, :t].unsqueeze(2).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_size
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        # Qwen3: RMSNorm over each head of the queries and keys, before RoPE.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout_p = cfg.dropout
        # The attention kernel: (q, k, v, mask, dropout_p) -> output. Context parallelism replaces it from
        # outside (megacore/parallel/context_parallel.py); the model itself never changes it.
        self.kernel = attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: DocumentMask | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim)
        k = self.wk(x).view(b, t, -1, self.head_dim)
        v = self.wv(x).view(b, t, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # (b, heads, t, head_dim); SDPA repeats the key/value heads for grouped-query attention.
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v, attn_mask = cache.update(k, v)
        out = self.kernel(q, k, v, attn_mask, self.dropout_p if self.training else 0.0)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_dim(cfg)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoE(cfg) if cfg.is_moe_layer(layer) else FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()  # off in eval mode

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: DocumentMask | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        # The cache goes by keyword: tensor-parallel plans match the positional inputs.
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, attn_mask, cache=cache))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A dict keyed by layer index keeps parameter names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":  # on meta: materialised and initialised later
            self.init_weights()

    def init_std(self, name: str) -> float | None:
        """How parameter `name` starts: N(0, std^2) for the returned std; None: ones (norm weights); 0:
        zeros (biases). Residual output projections are scaled by 1/sqrt(2 * n_layers)."""
        if name.endswith("norm.weight"):
            return None
        if name.endswith(".bias"):
            return 0.0
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.experts.w2")):
            return self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        return self.cfg.init_std

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Every parameter from (seed, its name, position) alone (megacore/model/init.py), so any split of
        the model initialises to the same weights. The seed defaults to torch's current one."""
        seed = torch.initial_seed() if seed is None else seed
        for name, p in self.named_parameters():
            init_slice(p, name, p.shape, [0] * p.dim(), self.init_std(name), seed)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The rotary tables, on the device the model now lives on (they are not saved in checkpoints), and
        the MoE routers' balancing bias and load counts at zero (a checkpoint's bias is loaded after)."""
        cos, sin = rope_tables(self.cfg, device=self.rope_cos.device)
        self.rope_cos, self.rope_sin = cos, sin
        for block in self.layers.values():
            if isinstance(block.feed_forward, MoE):
                block.feed_forward.router.expert_bias.zero_()
                block.feed_forward.router.tokens_per_expert.zero_()

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab); a pipeline stage without embeddings takes
        and a stage without the output head returns hidden states (batch, seq, dim). return_hidden: the
        final (normed) hidden states instead of logits, for a loss that applies the head itself
        (megacore/loss.py).

        position_ids (batch, seq) default to 0..seq-1; with model.document_masking they also confine
        attention to each document (a position 0 starts a new one). With a KVCache (generation), tokens
        continue the cached sequence: their positions follow it and they attend to it.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        mask = None
        if cache is not None:
            positions = torch.arange(cache.length, cache.length + tokens.shape[1], device=tokens.device)
            cos, sin = self.rope_cos[positions][None], self.rope_sin[positions][None]
        elif position_ids is None:
            cos, sin = self.rope_cos[None], self.rope_sin[None]
        else:
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
            mask = DocumentMask(position_ids) if self.cfg.document_masking else None
        for name, block in self.layers.items():
            h = block(h, cos, sin, mask) if cache is None else block(h, cos, sin, cache=cache.layer(name))
        if cache is not None:
            cache.length += tokens.shape[1]
        h = self.norm(h) if self.norm is not None else h
        return h if self.output is None or return_hidden else self.output(h)


class LayerCache:
    """One layer's keys and values (batch, kv_heads, max_len, head_dim), filled up to the cache's length."""

    def __init__(self, owner: KVCache, k: torch.Tensor, v: torch.Tensor):
        self.owner, self.k, self.v = owner, k, v

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values; return all of them so far and the mask for the new queries."""
        start, t = self.owner.length, k.shape[2]
        self.k[:, :, start:start + t], self.v[:, :, start:start + t] = k, v
        keys = torch.arange(start + t, device=k.device)
        # Query i (at position start + i) sees keys up to its own position. (Always explicit: SDPA's
        # is_causal aligns to the top-left, wrong for queries that follow a cached prefix.)
        mask = keys[None, :] <= (start + torch.arange(t, device=k.device))[:, None]
        return self.k[:, :, :start + t], self.v[:, :, :start + t], mask


class KVCache:
    """Keys and values of every layer for incremental decoding, up to max_len positions."""

    def __init__(self, model: Llama, batch: int, max_len: int, device=None, dtype=torch.float32):
        cfg = model.cfg
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_size)
        self.max_len, self.length = max_len, 0
        self._layers = {name: LayerCache(self, torch.zeros(shape, device=device, dtype=dtype),
                                         torch.zeros(shape, device=device, dtype=dtype)) for name in model.layers}

    def layer(self, name: str) -> LayerCache:
        return self._layers[name]


def num_params(model: nn.Module, exclude_embeddings: bool = False, active: bool = False) -> int:
    """Parameters of the model; `active`: those one token uses (k of each MoE layer's experts)."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings and isinstance(model, Llama):
        total -= model.tok_embeddings.weight.numel()
    if active and isinstance(model, Llama) and model.cfg.moe:
        idle = model.cfg.n_experts - model.cfg.n_active_experts
        total -= sum(idle * sum(w[0].numel() for w in (m.experts.w1, m.experts.w2, m.experts.w3))
                     for m in model.modules() if isinstance(m, MoE))
    return total


def ffn_weights(cfg: ModelConfig, layer: int) -> int:
    """Weights of layer `layer`'s feed-forward that one token multiplies with: its k active experts and the
    router in an MoE layer."""
    if cfg.is_moe_layer(layer):
        return 3 * cfg.dim * moe_hidden_dim(cfg) * cfg.n_active_experts + cfg.dim * cfg.n_experts
    return 3 * cfg.dim * ffn_hidden_dim(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward).

    Forward: 2 FLOPs per weight of every matmul a token goes through (the output head included, the
    embedding lookup not; an MoE layer's active experts and router only) plus attention scores and
    values, 2 * 2 * seq_len * dim per layer (the PaLM convention: the causal mask is not credited, as in
    published MFU figures).
    """
    head_dim = cfg.head_size
    attn_weights = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    matmul_weights = (cfg.n_layers * attn_weights + sum(ffn_weights(cfg, i) for i in range(cfg.n_layers))
                      + cfg.dim * cfg.vocab_size)
    attention = 4 * cfg.n_layers * seq_len * cfg.n_heads * head_dim
    return 3.0 * (2 * matmul_weights + attention)
