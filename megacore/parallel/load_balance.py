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


def moe_layers_of(parts: list[nn.Module]) -> list[tuple[int, MoE]]:
    """(layer index, MoE) of every MoE layer of a rank's model parts: found once, when the train module is
    built, not on every micro-batch."""
    return [(int(name.split(".")[name.split(".").index("layers") + 1]), moe)
            for part in parts for name, moe in moe_layers(part)]


def auxiliary_loss(layers: list[tuple[int, MoE]], group_mesh) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's share of the auxiliary loss, with gradient; the loss itself over all ranks, without)
    for the micro-batch just run forward. Consumes the routers' records."""
    stats = [moe.stats for _, moe in layers]
    for _, moe in layers:
        moe.stats = None
    n_experts = layers[0][1].router.n_experts
    counts = torch.stack([s.counts for s in stats]).sum(0)
    prob_sums = torch.stack([s.prob_sums for s in stats]).sum(0)
    rows = torch.tensor(float(sum(s.tokens for s in stats)), device=counts.device)  # layers x tokens
    glob = all_reduce_over(torch.cat([counts, prob_sums.detach(), rows[None]]), group_mesh)
    g_counts, g_probs, g_rows = glob[:n_experts], glob[n_experts:2 * n_experts], glob[-1]
    share = n_experts * (g_counts * prob_sums).sum() / g_rows ** 2
    total = n_experts * (g_counts * g_probs).sum() / g_rows ** 2
    return share, total


METRICS = ("load_min", "load_max", "load_entropy")


@torch.no_grad()
def after_step(layers: list[tuple[int, MoE]], group_mesh, bias_rate: float,
               skip: torch.Tensor | None = None) -> torch.Tensor:
    """The step's global expert loads: the balancing bias moved (unless the step was skipped: `skip` 1),
    the counts started again for the next step, and each layer's METRICS as a (layers, 3) device table:
    load_min and load_max (tokens of the least and most loaded expert over the mean) and load_entropy (of
    the token shares, over log n_experts: 1 is perfectly balanced)."""
    if not layers:
        return torch.zeros(0, len(METRICS))
    routers = [moe.router for _, moe in layers]
    loads = all_reduce_over(torch.stack([r.tokens_per_expert for r in routers]), group_mesh)
    for r in routers:
        r.tokens_per_expert.zero_()
    mean = loads.mean(-1, keepdim=True)
    if bias_rate > 0:
        delta = bias_rate * torch.sign(mean - loads)
        if skip is not None:
            delta = delta * (1 - skip)
        torch._foreach_add_([r.expert_bias for r in routers], list(delta.unbind(0)))
    share = loads / loads.sum(-1, keepdim=True).clamp_min(1)
    entropy = -(share * share.clamp_min(1e-30).log()).sum(-1) / math.log(loads.shape[-1])
    ratio = loads / mean.clamp_min(1e-30)
    return torch.stack([ratio.amin(-1), ratio.amax(-1), entropy], dim=-1)


def gather_over_stages(layer_ids: list[int], table: torch.Tensor, all_layer_ids: list[int], pp_group,
                       device: torch.device) -> torch.Tensor:
    """Every pipeline stage's rows of the METRICS table, in all_layer_ids order, on every pp rank (the rank
    that logs holds only its stage's layers; a stage may hold none): one all-reduce of layers x 3."""
    out = torch.zeros(len(all_layer_ids), len(METRICS), device=device)
    if layer_ids:
        out[[all_layer_ids.index(i) for i in layer_ids]] = table.to(device)
    dist.all_reduce(out, group=pp_group)  # (each layer lives on one stage; the others add zeros)
    return out


def load_metrics(layer_ids: list[int], table: torch.Tensor) -> dict[str, torch.Tensor]:
    """`moe/layer{i}/load_min|load_max|load_entropy` from the METRICS table's rows."""
    return {f"moe/layer{layer}/{metric}": table[i, j]
            for i, layer in enumerate(layer_ids) for j, metric in enumerate(METRICS)}
