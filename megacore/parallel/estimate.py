"""`megacore estimate`: parameters, FLOPs per token and per-rank memory for a layout, without starting
a distributed run.

Parameter, gradient and optimizer bytes come from the real parallel plan applied to the model on the
meta device (megacore/parallel/plan.py: the code a training rank runs, under a fake process group of
the job's size), so no memory is used and any world size up to thousands plans in seconds.
`analytic_numels` places the same parameters by arithmetic (pipeline stages keep their layers, tensor
parallelism splits the dims of its plan, FSDP splits dim 0 of what TP left, in torch.chunk pieces:
ceil-sized, the last rank possibly smaller); the test suite checks the two against each other and
against the real local tensors of a run (`memory.json`). Activations are an approximation
(Korthikanti et al., 2022, adapted to SwiGLU/GQA and our precision), not a measurement.
"""

from __future__ import annotations

import math

import torch

from megacore.config import Config
from megacore.loss import chunk_rows
from megacore.model.llama import Llama, ffn_hidden_dim, flops_per_token, num_params
from megacore.model.moe import moe_hidden_dim
from megacore.parallel.fsdp import experts_shard_dim
from megacore.parallel.layout import Layout
from megacore.parallel.pipeline import stage_layers

# Parameter names (suffixes) -> dim that tensor parallelism splits; norms are replicated.
_TP_DIM = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
           "attention.wq.bias": 0, "attention.wk.bias": 0, "attention.wv.bias": 0,
           "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
           "tok_embeddings.weight": 0, "output.weight": 0}


def chunk_size(n: int, parts: int, index: int) -> int:
    """Length of piece `index` when torch.chunk / DTensor Shard splits n into `parts`."""
    size = math.ceil(n / parts)
    return max(0, min(size, n - index * size))


def _tp_dim(name: str) -> int | None:
    for suffix, dim in _TP_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


def param_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape in the whole model (built once, on meta)."""
    with torch.device("meta"):
        model = Llama(cfg.model)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def analytic_numels(cfg: Config, layout: Layout, rank: int, shapes: dict | None = None) -> dict[str, int]:
    """Elements of each parameter held by `rank` (names of the whole model; absent = not on this rank)."""
    shapes = shapes if shapes is not None else param_shapes(cfg)
    c = layout.coordinates(rank)
    n_stages = layout.n_stages
    if layout.pp > 1:
        layers = stage_layers(cfg.model.n_layers, n_stages)
        mine = set(range(c["pp"], n_stages, layout.pp))
        keep_layers = {l for s in mine for l in layers[s]}
        first, last = 0 in mine, n_stages - 1 in mine
    else:
        keep_layers, first, last = set(range(cfg.model.n_layers)), True, True
    out = {}
    for name, full in shapes.items():
        if name.startswith("layers.") and int(name.split(".")[1]) not in keep_layers:
            continue
        if (name.startswith("tok_embeddings") and not first) or \
                (name.startswith(("norm.", "output.")) and not last):
            continue
        shape = list(full)
        dim = _tp_dim(name)
        if layout.tp > 1 and dim is not None:
            shape[dim] = chunk_size(shape[dim], layout.tp, c["tp"])
        if ".experts." in name and layout.fsdp_size > 1:
            # Experts split over ep, then FSDP over what ep leaves, on dim 0 or 1 (experts_shard_dim).
            shards, index = layout.dp_shard * layout.cp, c["dp_shard_cp"]
            if layout.ep > 1:
                shape[0] = chunk_size(shape[0], layout.ep, c["ep"])
                shards, index = layout.dp_shard // layout.ep, c["efsdp"]
            dim = experts_shard_dim(cfg.model.n_experts // layout.ep, shards)
            shape[dim] = chunk_size(shape[dim], shards, index)
        elif layout.fsdp_size > 1:  # FSDP shards dim 0 over dp_shard x cp
            shape[0] = chunk_size(shape[0], layout.dp_shard * layout.cp, c["dp_shard_cp"])
        out[name] = math.prod(shape)
    return out


def block_activations(cfg: Config, layout: Layout, layers_here: int, cp_rank: int = 0, moe_here: int = 0) -> float:
    """Bytes that the transformer blocks of a rank keep for the backward of one micro-batch (what autograd
    saves; parameters not counted). Under context parallelism a rank keeps seq_len / cp tokens of
    everything but keys and values, and the keys and values of the whole sequence (the all-gather); on a
    CPU device the per-document kernel's lower-right masks too (megacore/parallel/context_parallel.py;
    the figure for one document per window, an upper bound with document masking). `moe_here` of the
    layers are MoE layers: k copies of each token through its experts instead of the dense MLP."""
    dense = _block_activations(cfg, layout, cp_rank, moe=False)
    return dense * (layers_here - moe_here) + (_block_activations(cfg, layout, cp_rank, moe=True) * moe_here
                                               if moe_here else 0.0)


def _block_activations(cfg: Config, layout: Layout, cp_rank: int, moe: bool) -> float:
    """block_activations of one layer."""
    m, b, t, cp = cfg.model, cfg.train.micro_batch_size, cfg.data.seq_len, layout.cp
    # (auto counts as bf16: plans are made for GPUs, where auto is bf16)
    act_bytes = 4 if cfg.train.mixed_precision == "fp32" else 2
    hidden, q, kv = ffn_hidden_dim(m), m.n_heads * m.head_size, m.n_kv_heads * m.head_size
    # Per layer and token (measured in fp32): the block input, the two norms' input scaled and output,
    # the residual after attention (6 x dim); queries and the attention output (2 x q); keys and values
    # (2 x kv); the MLP's w1 and w3 outputs, silu and the product (4 x hidden); the rotary cos/sin rows
    # (2 x head_size) and the attention's log-sum-exp (one per head).
    mlp = 4 * hidden
    if moe:
        # The router's logits and probabilities (fp32), then per chosen expert (k per token): the token's
        # copy, its expert's w1 and w3 outputs, silu and product, the output and its weighted copy; under
        # expert parallelism the all-to-all's received tokens and returned outputs too.
        hidden = moe_hidden_dim(m)
        mlp = 2 * m.n_experts + m.n_active_experts * (3 * m.dim + 4 * hidden + (2 * m.dim if layout.ep > 1 else 0))
    per_token = (6 * m.dim + 2 * q + mlp + 2 * m.head_size + m.n_heads) / layout.tp
    kv_per_token = 2 * kv / layout.tp
    if cfg.parallel.activation_checkpointing == "full":
        per_token, kv_per_token = m.dim / layout.tp, 0  # only the block input survives
    elif cfg.parallel.activation_checkpointing == "selective":
        per_token = (2 * q + 2 * hidden * (m.n_active_experts if moe else 1)) / layout.tp  # matmul outputs only
    in_flight = layout.pp if layout.pp > 1 else 1  # 1F1B holds up to pp micro-batches per stage
    tokens = b * (t // cp)
    if cp > 1 and cfg.parallel.cp_regather_kv:  # only the local keys and values stay; the attention's
        # saved outputs are recomputed in the backward (the queries and its output stay, as the block's)
        return tokens * (per_token + kv_per_token) * act_bytes * in_flight
    per_layer = (tokens * per_token + b * t * kv_per_token) * act_bytes
    if cp > 1 and cfg.train.device == "cpu" and kv_per_token:
        c = t // (2 * cp)  # each query chunk's boolean mask, kept as fp32 by SDPA: c x (keys up to its end)
        masked = [chunk + 1 for chunk in (cp_rank, 2 * cp - 1 - cp_rank) if chunk > 0]
        per_layer += b * sum(c * n * c for n in masked) * 4
    return per_layer * in_flight


def memory_per_rank(cfg: Config, layout: Layout, numels: dict[str, int], cp_rank: int = 0) -> dict[str, float]:
    """Bytes on a rank holding `numels` of each parameter: fp32 parameters and gradients, AdamW state
    (two moments and a step count per parameter tensor), and approximate peak activations of one
    micro-batch (the blocks', the loss's logits and FSDP's gathered units)."""
    elements = sum(numels.values())
    m, b, t = cfg.model, cfg.train.micro_batch_size, cfg.data.seq_len // layout.cp
    hidden = ffn_hidden_dim(m)
    layers_here = len({n.split(".")[1] for n in numels if n.startswith("layers.")})
    moe_here = len({n.split(".")[1] for n in numels if ".experts." in n})
    activations = block_activations(cfg, layout, layers_here, cp_rank, moe_here)
    if any(n.startswith("output.") for n in numels):
        if layout.tp > 1:  # loss parallel: fp32 logits of this rank's vocabulary shard and their gradient
            activations += b * t * m.vocab_size / layout.tp * 4 * 2
        else:  # the head's chunked loss: one chunk of fp32 logits, and the hidden states' gradient
            activations += chunk_rows(m.vocab_size) * m.vocab_size * 4 + b * t * m.dim * 4
    if layout.fsdp_size > 1 and layout.backend == "torch":
        # FSDP's gathered weights (approx.): the norm + head unit, kept gathered from its forward through
        # its backward, and two blocks (the one computing and the next, prefetched); in the backward, one
        # block's unsharded gradients and the reduce-scatter's input they are copied into (two more).
        param_bytes = 2 if cfg.train.mixed_precision != "fp32" else 4
        mlp = 3 * m.dim * hidden
        if m.moe:  # an MoE block gathers its router and the experts this ep rank holds
            mlp = max(mlp, 3 * m.dim * moe_hidden_dim(m) * m.n_experts // layout.ep + m.dim * m.n_experts)
        block = m.dim * m.head_size * (2 * m.n_heads + 2 * m.n_kv_heads) + mlp + 2 * m.dim
        head = m.vocab_size * m.dim if any(n.startswith("output.") for n in numels) else 0
        activations += (head + 4 * block) / layout.tp * param_bytes
    grad_elements = elements
    if layout.tp > 1 and layout.fsdp_size == 1 and "tok_embeddings.weight" in numels:
        # The row-parallel embedding's backward yields a replicated (full-vocabulary) gradient; with
        # FSDP the reduce-scatter shards it again.
        grad_elements += m.vocab_size * m.dim - numels["tok_embeddings.weight"]
    return {"parameters": 4 * elements, "gradients": 4 * grad_elements,
            "optimizer": 8 * elements + 4 * len(numels), "activations_approx": activations}


def estimate(cfg: Config, world_size: int, analytic: bool = False) -> dict:
    """Parameters, FLOPs and every rank's bytes on `world_size` ranks: from the real plan (default), or
    by arithmetic alone (analytic=True: no torch.distributed at all)."""
    layout = Layout.resolve(cfg, world_size)
    with torch.device("meta"):
        model = Llama(cfg.model)
    if analytic:
        shapes = param_shapes(cfg)
        numels = [analytic_numels(cfg, layout, r, shapes) for r in range(world_size)]
    else:
        from megacore.parallel.plan import planned_numels

        numels = planned_numels(cfg, layout)
    ranks = [dict(rank=r, **memory_per_rank(cfg, layout, numels[r], layout.coordinates(r)["cp"]))
             for r in range(world_size)]
    return {
        "parameters": num_params(model),
        "parameters_without_embeddings": num_params(model, exclude_embeddings=True),
        "active_parameters": num_params(model, active=True),
        "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len),
        "layout": {d: getattr(layout, d) for d in ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep")},
        "pp_schedule": layout.pp_schedule if layout.pp > 1 else None,
        "ranks": ranks,
    }


def format_estimate(est: dict) -> str:
    gib = 2**30
    lay = est["layout"]
    active = est.get("active_parameters", est["parameters"])
    lines = [f"parameters: {est['parameters'] / 1e6:,.2f}M ({est['parameters_without_embeddings'] / 1e6:,.2f}M "
             f"without embeddings" + (f"; {active / 1e6:,.2f}M active per token" if active != est["parameters"] else "")
             + f"); {est['flops_per_token'] / 1e9:.3f} GFLOP per token (training)",
             f"layout: pp {lay['pp']} x dp_replicate {lay['dp_replicate']} x dp_shard {lay['dp_shard']}"
             + (f" (ep {lay['ep']})" if lay.get("ep", 1) > 1 else "") + f" x cp {lay.get('cp', 1)} x tp {lay['tp']}"
             + (f", schedule {est['pp_schedule']}" if est["pp_schedule"] else ""),
             f"{'rank':>5} {'params GiB':>11} {'grads GiB':>10} {'optim GiB':>10} {'activ. GiB (approx)':>20} {'total':>8}"]
    for r in est["ranks"]:
        total = r["parameters"] + r["gradients"] + r["optimizer"] + r["activations_approx"]
        lines.append(f"{r['rank']:>5} {r['parameters'] / gib:>11.3f} {r['gradients'] / gib:>10.3f} "
                     f"{r['optimizer'] / gib:>10.3f} {r['activations_approx'] / gib:>20.3f} {total / gib:>8.3f}")
    return "\n".join(lines)
