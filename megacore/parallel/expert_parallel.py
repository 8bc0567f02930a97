"""Expert parallelism: each MoE layer's experts sharded over the `ep` ranks of the mesh, tokens sent to the
rank that holds their expert and back with all-to-all.

The experts' weights become DTensors sharded over experts (Shard(0) on mesh["ep"]); FSDP then shards each
rank's experts over the rest of the data-parallel ranks (megacore/parallel/fsdp.py). The model's MoE
layer is unchanged: it sorts its tokens by expert and calls its experts module with the tokens and the
count per expert; hooks on that module, applied here from outside, turn the call into

  1. an all-to-all of the counts (each rank learns how many tokens of each source go to its experts),
  2. an all-to-all of the tokens (uneven splits, with autograd: `all_to_all_single_autograd`),
  3. a reorder from source-major to expert-major, so the local experts run as one grouped GEMM,
  4. and the reverse: reorder back, all-to-all back to the ranks the tokens came from.

What grows with what: per layer and micro-batch, two all-to-alls of tokens x k x dim elements in each
direction, one of n_experts counts, and one host read of ep numbers (the split sizes).

Gradients: each expert's weights see every ep rank's tokens, so FSDP's average over the expert FSDP
group (ep times smaller than the data-parallel group) would be ep times too large; the experts' FSDP
unit divides by the whole data-parallel size instead (apply_fsdp's `expert_divide`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from megacore.model.moe import GroupedExperts, moe_layers


def expert_major_order(counts: torch.Tensor, total: int) -> torch.Tensor:
    """counts (sources, local experts), `total` rows: rows arrive source-major (source 0's tokens for
    expert 0, 1, ..., then source 1's); the permutation that groups them by expert, sources in order
    within each."""
    sizes = counts.flatten()
    starts = (sizes.cumsum(0) - sizes).view_as(counts)
    by_expert_starts, by_expert_sizes = starts.t().flatten(), counts.t().flatten()
    new_starts = by_expert_sizes.cumsum(0) - by_expert_sizes
    shift = torch.repeat_interleave(by_expert_starts - new_starts, by_expert_sizes, output_size=total)
    return shift + torch.arange(total, device=counts.device)


class TokenDispatch:
    """The hooks of one experts module: tokens out to their experts' ranks before it, back after it."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int):
        self.group, self.ranks = group, dist.get_world_size(group)
        self.local_experts = n_experts // self.ranks
        self._pending: list[tuple] = []  # (send splits, receive splits, order) of the forward in flight

    def dispatch(self, module: nn.Module, args: tuple) -> tuple:
        x, counts = args  # x grouped by (global) expert; counts (n_experts,)
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)  # [source][my local expert]
        received = received.view(self.ranks, self.local_experts)
        splits = torch.stack([counts.view(self.ranks, self.local_experts).sum(1), received.sum(1)]).tolist()
        send, recv = splits
        x = all_to_all_single_autograd(x, recv, send, self.group)
        order = expert_major_order(received, sum(recv))
        self._pending.append((send, recv, order))
        return x[order], received.sum(0)

    def combine(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        send, recv, order = self._pending.pop()
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        return all_to_all_single_autograd(out[back], send, recv, self.group)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over `ep_mesh` (on the meta device, before FSDP) and hook the token
    dispatch around them."""
    for _, moe in moe_layers(model):
        experts: GroupedExperts = moe.experts
        for name, p in list(experts.named_parameters(recurse=False)):
            experts.register_parameter(name, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)])))
        hooks = TokenDispatch(ep_mesh.get_group(), moe.router.n_experts)
        experts.register_forward_pre_hook(hooks.dispatch)
        experts.register_forward_hook(hooks.combine)
