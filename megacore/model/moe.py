"""Mixture-of-experts feed-forward: a top-k token-choice router and dropless grouped SwiGLU experts.

Plain PyTorch, as the dense model: expert parallelism (megacore/parallel/expert_parallel.py) wraps the
experts from outside, dispatching the tokens to the ranks that hold their experts and back, and load
balancing across ranks (megacore/parallel/load_balance.py) reads what the routers record here.

Routing follows transformers' Qwen3-MoE and Mixtral: softmax over all experts in fp32, the top k chosen,
their probabilities renormalised to sum to one when `moe_norm_topk` (Mixtral always). With
auxiliary-loss-free balancing (DeepSeek-V3) a per-expert bias is added to the scores for the choice only;
the weights stay the unbiased probabilities. No token is dropped: every expert takes all its tokens,
as many as they are, in one grouped GEMM (`torch._grouped_mm`) or, where its stride rules or the device
do not allow it, a loop over experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from megacore.config import ModelConfig


def moe_hidden_dim(cfg: ModelConfig) -> int:
    return cfg.expert_width


class Routing(NamedTuple):
    """Each token's chosen experts and their weights, and what load balancing needs."""

    experts: torch.Tensor  # (tokens, k) int64, chosen experts
    weights: torch.Tensor  # (tokens, k) fp32, their weights in the output
    probs: torch.Tensor  # (tokens, n_experts) fp32, the softmax over all experts (with gradient)


class RouterStats(NamedTuple):
    """One MoE layer's routing in the last training forward: the auxiliary loss's inputs."""

    counts: torch.Tensor  # (n_experts,) fp32, tokens sent to each expert (k per token), no gradient
    prob_sums: torch.Tensor  # (n_experts,) fp32, the router probabilities summed over tokens (with gradient)
    tokens: int


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk = cfg.n_experts, cfg.n_active_experts, cfg.moe_norm_topk
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        # Auxiliary-loss-free balancing: added to the scores when choosing experts, not to the weights.
        # Updated after each optimizer step (megacore/parallel/load_balance.py) and checkpointed.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts), persistent=True)
        # Tokens each expert received in this step's training forwards (for the bias update and the load
        # metrics).
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> Routing:
        # In fp32 whatever the activations' precision (autocast included): the choice is discrete, small
        # errors flip it.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())
        probs = logits.softmax(dim=-1)
        _, experts = torch.topk(probs + self.expert_bias, self.top_k, dim=-1)
        weights = probs.gather(-1, experts)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(experts, weights, probs)


def grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands: its strides must be multiples of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x.device.type not in ("cpu", "cuda"):
        return False
    # CUDA: bf16 on Hopper only (on Blackwell, experts without tokens get non-zero gradients: pytorch#172439).
    if x.device.type == "cuda" and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability()[0] != 9):
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or any(w.dtype != x.dtype for w in weights):
        return False
    align = 16 // x.element_size()
    return all(d % align == 0 for w in weights for d in w.shape[1:]) and x.shape[-1] % align == 0


def expert_swiglu(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  w3: torch.Tensor, grouped: bool | None = None) -> torch.Tensor:
    """x (tokens, dim) grouped by expert, counts[e] rows for expert e; w1, w3 (experts, hidden, dim) and
    w2 (experts, dim, hidden) as nn.Linear stores them -> (tokens, dim). An expert with no rows is skipped."""
    if x.shape[0] == 0:
        # No tokens (an expert-parallel rank nobody routed to): still part of the graph, so that every rank
        # reduces the same (zero) weight gradients and runs the dispatch's backward all-to-all
        # (torch._grouped_mm has no backward for 0 rows).
        return x.new_zeros(0, w2.shape[1]) + 0 * (x.sum() + w1.sum() + w2.sum() + w3.sum())
    if torch.is_autocast_enabled(x.device.type):  # (autocast does not reach torch._grouped_mm)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w2, w3 = (t.to(dtype) for t in (x, w1, w2, w3))
    grouped = grouped_mm_ok(x, w1, w2) if grouped is None else grouped
    if grouped:
        offsets = counts.cumsum(0).to(torch.int32)
        gate = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets)
        up = torch._grouped_mm(x, w3.transpose(-2, -1), offs=offsets)
        return torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offsets)
    outs = []
    for e, rows in enumerate(torch.split(x, counts.tolist())):  # (one host read of the counts)
        if rows.shape[0]:
            outs.append(F.linear(F.silu(F.linear(rows, w1[e])) * F.linear(rows, w3[e]), w2[e]))
    return torch.cat(outs)


class GroupedExperts(nn.Module):
    """n_experts SwiGLU experts as batched weights, in nn.Linear's (out, in) layout per expert so that a
    published model's per-expert tensors are slices of them. Under expert parallelism the weights are
    sharded over experts and this module sees its own experts' tokens only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = moe_hidden_dim(cfg)
        self.w1 = nn.Parameter(torch.empty(cfg.n_experts, hidden, cfg.dim))
        self.w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, hidden))
        self.w3 = nn.Parameter(torch.empty(cfg.n_experts, hidden, cfg.dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Sharded over experts (a DTensor): this rank's experts, which are the ones counts describe.
        w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w2, self.w3))
        return expert_swiglu(x, counts, w1, w2, w3)


class MoE(nn.Module):
    """Router + experts: each token's output is the weighted sum of its k experts' outputs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg)
        self.stats: RouterStats | None = None  # the last training forward's, read by the train module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        route = self.router(flat)
        chosen = route.experts.flatten()  # (tokens * k,)
        counts = torch.bincount(chosen, minlength=self.router.n_experts)
        # Recorded in a training forward, not in its recomputation in the backward (activation
        # checkpointing), which would count the tokens twice and keep the recomputed graph alive.
        if self.training and torch._C._current_graph_task_id() == -1:
            with torch.no_grad():
                self.router.tokens_per_expert += counts
            self.stats = RouterStats(counts.float(), route.probs.sum(0), flat.shape[0])
        order = torch.argsort(chosen, stable=True)  # grouped by expert, tokens in order within each
        token = order // self.router.top_k
        out = self.experts(flat[token], counts)
        out = out * route.weights.flatten()[order].unsqueeze(-1).to(out.dtype)
        return torch.zeros_like(flat).index_add_(0, token, out).reshape(shape)


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(layer name, MoE) of a model part's MoE layers, in layer order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
