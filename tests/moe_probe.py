"""Run under torchrun by tests/test_moe.py: one training step of a tiny mixture of experts (a dense first
layer, then MoE layers of 4 experts, top 2) under the layout its overrides give, against one plain process
computing the same batch on every rank: the summed loss, the auxiliary loss (against transformers'
`load_balancing_loss_func` on the reference's router logits) and every gradient. Writes OUT/rank{R}.json
with the largest differences, relative to each tensor's scale.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/moe_probe.py OUT CASE [KEY=VALUE ...]

CASE: "step" (a random batch), or "starved" (the balancing bias keeps experts 2 and 3 from ever being
chosen: under ep=2 the second rank's experts receive no tokens).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from data_pipeline.loader import IGNORE_INDEX
from megacore.config import load_config
from megacore.distributed import init_distributed, shutdown
from megacore.loss import loss_sum
from megacore.model import Llama
from megacore.model.moe import Router, moe_layers
from megacore.parallel.layout import Layout
from megacore.parallel.load_balance import after_step, moe_layers_of
from megacore.parallel.materialize import canonical_name
from megacore.train.torch_module import build_torch_module
from tests.cp_probe import full, scale_of
from tests.helpers import REPO

SEQ, ROWS = 32, 4
MODEL = ["model.dim=64", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=128",
         f"model.max_seq_len={SEQ}", f"data.seq_len={SEQ}", f"train.global_batch_size={ROWS}",
         "train.mixed_precision=fp32", "model.n_experts=4", "model.n_active_experts=2", "model.moe_ffn_dim=32",
         "model.moe_dense_layers=[0]", "model.family=qwen3_moe", "model.qk_norm=true"]
STARVED_BIAS = torch.tensor([0.0, 0.0, -10.0, -10.0])


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (ROWS, SEQ + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=g) < 0.1] = IGNORE_INDEX
    return {"input_ids": tokens[:, :-1], "labels": labels}


def starve(model: torch.nn.Module) -> None:
    for _, moe in moe_layers(model):
        moe.router.expert_bias.copy_(STARVED_BIAS)


def reference(cfg, data, case, groups) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict]:
    """One plain process: (summed token loss, transformers' auxiliary loss, gradients of loss / target tokens
    + coef x auxiliary loss by parameter name, each MoE layer's balancing bias after the step). The
    auxiliary loss is the mean of transformers' over `groups`, the rows of each global micro-batch (a
    micro-batch of every data-parallel rank together)."""
    model = Llama(cfg.model)
    model.init_weights(cfg.train.seed)
    if case == "starved":
        starve(model)
    logits = []  # each router's, as transformers' function takes them (softmax of log p is p)
    for module in model.modules():
        if isinstance(module, Router):
            module.register_forward_hook(lambda m, args, out: logits.append(out.probs.log()))
    model.train()
    loss = loss_sum(model(data["input_ids"]), data["labels"])
    auxes = []
    for rows in groups:
        mine = tuple(layer.view(ROWS, SEQ, -1)[rows].flatten(0, 1) for layer in logits)
        if case == "starved":  # (transformers' function chooses without the bias; ours counts what was chosen)
            auxes.append(_aux_with_choice(mine, cfg.model.n_experts, cfg.model.n_active_experts))
        else:
            auxes.append(load_balancing_loss_func(mine, cfg.model.n_experts, cfg.model.n_active_experts))
    aux = torch.stack(auxes).mean()
    objective = loss / (data["labels"] != IGNORE_INDEX).sum() + cfg.model.moe_aux_loss_coef * aux
    objective.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    after_step(moe_layers_of([model]), None, cfg.model.moe_bias_update_rate)
    biases = {name: moe.router.expert_bias.clone() for name, moe in moe_layers(model)}
    return loss.detach(), aux.detach(), grads, biases


def _aux_with_choice(logits, n_experts, k) -> torch.Tensor:
    """transformers' formula with the experts chosen under STARVED_BIAS."""
    counts, probs, rows = torch.zeros(n_experts), torch.zeros(n_experts), 0
    for layer in logits:
        p = layer.softmax(-1)
        chosen = torch.topk(p + STARVED_BIAS, k, dim=-1).indices
        counts += torch.bincount(chosen.flatten(), minlength=n_experts)
        probs = probs + p.sum(0)
        rows += p.shape[0]
    return n_experts * (counts / rows * probs / rows).sum()


def main(out: str, case: str, overrides: list[str]) -> None:
    env = init_distributed("cpu")
    try:
        cfg = load_config(REPO / "configs/tiny.yaml", [*MODEL, f"train.run_dir={out}/run", *overrides])
        layout = Layout.resolve(cfg, env.world_size)
        data = batch()
        module = build_torch_module(cfg, layout, env, None)
        if case == "starved":
            for part in module.parts:
                starve(part)
        per_rank, mbs = ROWS // layout.dp_size, cfg.train.micro_batch_size
        rows = slice(module.dp_rank * per_rank, (module.dp_rank + 1) * per_rank)
        mine = {k: v[rows] for k, v in data.items()}
        groups = [[r * per_rank + m * mbs + j for r in range(layout.dp_size) for j in range(mbs)]
                  for m in range(layout.n_micro)]
        ref_loss, ref_aux, ref_grads, ref_biases = reference(cfg, data, case, groups)
        tokens = int((data["labels"] != IGNORE_INDEX).sum())
        module.train(True)
        loss = module.train_batch(mine, module.grad_average_size / tokens)
        total = loss.detach().clone() if module.reports_loss else torch.zeros_like(loss)
        dist.all_reduce(total)
        report = {"loss": abs(total.item() - ref_loss.item()) / ref_loss.item(), "grads": {},
                  # tokens each expert received on this rank, per MoE layer
                  "tokens_per_expert": [m.router.tokens_per_expert.tolist() for p in module.parts
                                        for _, m in moe_layers(p)]}
        if "moe/aux_loss" in module.routing:
            report["aux"] = abs(module.routing["moe/aux_loss"].item() - ref_aux.item()) / ref_aux.item()
        for part in module.parts:
            for name, p in part.named_parameters():
                name = canonical_name(name)
                local = p.to_local() if isinstance(p, DTensor) else p
                report["grads"][name] = (full(p.grad) - ref_grads[name]).abs().max().item() / scale_of(ref_grads[name])
                report.setdefault("local_experts", {})[name] = list(local.shape)
        # The optimizer step moves the balancing bias from the step's global loads: one process's values.
        module.optim_step(1e-3)
        report["bias"] = {name: (moe.router.expert_bias - ref_biases[canonical_name(name)]).abs().max().item()
                          for part in module.parts for name, moe in moe_layers(part)}
        report["bias_moved"] = max(b.abs().max().item() for b in ref_biases.values())
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"rank{env.rank}.json").write_text(json.dumps(report))
        del module
    finally:
        shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
