"""Load balancing of the MoE routers across every data-parallel rank: the auxiliary loss, the
auxiliary-loss-free bias update, and the per-layer load metrics.

Both read what the routers record in the training forward (megacore/model/moe.py) and reduce it over
`group_mesh`, the ranks that hold different tokens of the same layers (dp_replicate x dp_shard x cp),
so that a batch split over any number of ranks gives the same loss, update and metrics as one process.

Auxiliary loss: transformers' `load_balancing_loss_func`, whose coefficient is `router_aux_loss_coef`:
with f_e the share of token-choices that went to expert e and P_e the mean router probability of e, both
over all MoE layers and tokens together, loss = n_experts * sum_e f_e * P_e. It is computed per
micro-batch over all data-parallel ranks (as transformers computes it per forward), from the global
counts; each rank's share carries the gradient of its own probabilities, and the shares sum to the loss.

Auxiliary-loss-free balancing (DeepSeek-V3): after each optimizer step, expert_bias += rate x sign(mean
load - load) per layer, from the step's global counts; the bias only changes which experts are chosen.

What grows with what: one all-reduce of 2 x layers x n_experts floats per micro-batch (auxiliary loss)
and one of layers x n_experts per step (bias and metrics).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megacore.model.moe import MoE, moe_layers


def all_reduce_over(tensor: torch.Tensor, mesh) -> torch.Tensor:
    """Sum `tensor` in place over every dimension of `mesh` (None: one rank, nothing to do)."""
    if mesh is not None:
        for dim in range(mesh.ndim):
            dist.all_reduce(tensor, group=mesh.get_group(dim))
    return tensor


def auxiliary_loss(parts: list[nn.Module], group_mesh) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's share of the auxiliary loss, with gradient; the loss itself over all ranks, without)
    for the micro-batch just run forward. Consumes the routers' records."""
    layers = [moe for part in parts for _, moe in moe_layers(part)]
    stats = [moe.stats for moe in layers]
    for moe in layers:
        moe.stats = None
    n_experts = layers[0].router.n_experts
    counts = torch.stack([s.counts for s in stats]).sum(0)
    prob_sums = torch.stack([s.prob_sums for s in stats]).sum(0)
    rows = torch.tensor(float(sum(s.tokens for s in stats)), device=counts.device)  # layers x tokens
    glob = all_reduce_over(torch.cat([counts, prob_sums.detach(), rows[None]]), group_mesh)
    g_counts, g_probs, g_rows = glob[:n_experts], glob[n_experts:2 * n_experts], glob[-1]
    share = n_experts * (g_counts * prob_sums).sum() / g_rows ** 2
    total = n_experts * (g_counts * g_probs).sum() / g_rows ** 2
    return share, total


def reset_counts(parts: list[nn.Module]) -> None:
    for part in parts:
        for _, moe in moe_layers(part):
            moe.router.tokens_per_expert.zero_()
            moe.stats = None


@torch.no_grad()
def after_step(parts: list[nn.Module], group_mesh, bias_rate: float, skip: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """The step's global expert loads: the balancing bias moved (unless the step was skipped: `skip` 1),
    and the load metrics of each layer, as device tensors: load_min and load_max (tokens of the least and
    most loaded expert over the mean) and load_entropy (of the token shares, over log n_experts: 1 is
    perfectly balanced)."""
    layers: list[tuple[str, MoE]] = [(name, moe) for part in parts for name, moe in moe_layers(part)]
    if not layers:
        return {}
    loads = all_reduce_over(torch.stack([moe.router.tokens_per_expert for _, moe in layers]), group_mesh)
    mean = loads.mean(-1, keepdim=True)
    if bias_rate > 0:
        delta = bias_rate * torch.sign(mean - loads)
        if skip is not None:
            delta = delta * (1 - skip)
        torch._foreach_add_([moe.router.expert_bias for _, moe in layers], list(delta.unbind(0)))
    share = loads / loads.sum(-1, keepdim=True).clamp_min(1)
    entropy = -(share * share.clamp_min(1e-30).log()).sum(-1) / math.log(loads.shape[-1])
    ratio = loads / mean.clamp_min(1e-30)
    metrics = {}
    for i, (name, _) in enumerate(layers):
        layer = _layer_index(name)
        metrics.update({f"moe/layer{layer}/load_min": ratio[i].min(), f"moe/layer{layer}/load_max": ratio[i].max(),
                        f"moe/layer{layer}/load_entropy": entropy[i]})
    reset_counts(parts)
    return metrics


METRICS = ("load_min", "load_max", "load_entropy")


def gather_over_stages(metrics: dict[str, torch.Tensor], moe_layers_ids: list[int], pp_group,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """Every pipeline stage's layer metrics on every pp rank (the rank that logs holds only its stage's
    layers; a stage may hold none): one all-reduce of layers x 3 values."""
    table = torch.zeros(len(moe_layers_ids), len(METRICS), device=device)
    for i, layer in enumerate(moe_layers_ids):
        for j, metric in enumerate(METRICS):
            if f"moe/layer{layer}/{metric}" in metrics:
                table[i, j] = metrics[f"moe/layer{layer}/{metric}"]
    dist.all_reduce(table, group=pp_group)  # (each layer lives on one stage; the others add zeros)
    out = {k: v for k, v in metrics.items() if not k.startswith("moe/layer")}
    for i, layer in enumerate(moe_layers_ids):
        out.update({f"moe/layer{layer}/{metric}": table[i, j] for j, metric in enumerate(METRICS)})
    return out


def _layer_index(name: str) -> str:
    parts = name.split(".")
    return parts[parts.index("layers") + 1]
