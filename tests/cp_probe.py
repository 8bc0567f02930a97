"""Run under torchrun by tests/test_context_parallel.py: one training step's logits, summed loss and every
gradient of the tiny model under the layout its overrides give, against one plain process computing the same
batch on every rank. Writes OUT/rank{R}.json with the largest differences, relative to each tensor's scale.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/cp_probe.py OUT CASE [KEY=VALUE ...]

CASE: "windows" (packed documents crossing chunk edges, one longer than two chunks, a window that starts
mid-document, 1-token documents) or "leak" (one token changed: which outputs move).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from data_pipeline.loader import IGNORE_INDEX
from megacore.config import load_config
from megacore.distributed import init_distributed, shutdown
from megacore.loss import loss_sum
from megacore.model import Llama
from megacore.parallel.context_parallel import unshard_sequence
from megacore.parallel.layout import Layout
from megacore.parallel.materialize import canonical_name
from megacore.train.torch_module import build_torch_module
from tests.helpers import REPO

SEQ = 64
# Document lengths per row of a 64-token window cut into 4 chunks of 16 at cp=2 (row 0 starts 5 tokens into
# its first document). Together: documents crossing chunk edges, one of 40 tokens (longer than two chunks),
# 1-token documents, a document ending exactly on a chunk edge, a whole-window document.
DOCUMENTS = [(5, [10, 1, 1, 40, 12]), (0, [16, 7, 1, 25, 15]), (0, [64]), (0, [3, 30, 31])]
MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=128",
         f"model.max_seq_len={SEQ}", f"data.seq_len={SEQ}", "train.global_batch_size=4", "train.micro_batch_size=2",
         "train.mixed_precision=fp32"]


def window_batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (len(DOCUMENTS), SEQ + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=g) < 0.1] = IGNORE_INDEX  # (as prompts in fine-tuning)
    positions = torch.cat([torch.cat([torch.arange(len_) + (offset if i == 0 else 0) for i, len_ in enumerate(lens)])
                           [None] for offset, lens in DOCUMENTS])
    return {"input_ids": tokens[:, :-1], "labels": labels, "position_ids": positions}


def long_batch(cfg) -> dict[str, torch.Tensor]:
    """One micro-batch of data.seq_len random tokens (one document per row)."""
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)
    tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    return {"input_ids": tokens, "labels": tokens, "position_ids": torch.arange(shape[1]).expand(shape)}


def reference(cfg, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One plain process: (logits, summed loss, gradients of loss / target tokens by parameter name)."""
    model = Llama(cfg.model)
    model.init_weights(cfg.train.seed)
    positions = batch["position_ids"] if cfg.model.document_masking else None
    logits = model(batch["input_ids"], positions)
    loss = loss_sum(logits, batch["labels"])
    (loss / (batch["labels"] != IGNORE_INDEX).sum()).backward()
    return logits.detach(), loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def distributed_logits(module, layout: Layout, rank: int, x, pos) -> torch.Tensor | None:
    """This rank's logits of its share (None on pipeline ranks without the head), gathered over cp into
    sequence order. Pipeline: stage 0's hidden states go to the stage 1 rank of the same coordinates."""
    part = module.parts[0]
    if layout.pp > 1:
        peer_offset = layout.world_size // layout.pp
        if part.tok_embeddings is not None:
            dist.send(full(part(x, pos)).contiguous(), rank + peer_offset)
            return None
        h = torch.empty((*x.shape, part.cfg.dim))
        dist.recv(h, rank - peer_offset)
        out = part(h, pos)
    else:
        out = part(x, pos)
    out = full(out).contiguous()
    if layout.cp == 1:
        return out
    gathered = torch.empty((layout.cp * out.shape[0], *out.shape[1:]))
    dist.all_gather_single(gathered, out, group=part.layers[next(iter(part.layers))].attention.kernel.group)
    return unshard_sequence(gathered.unflatten(0, (layout.cp, -1)).transpose(0, 1).flatten(1, 2), layout.cp, dim=1)


def scale_of(t: torch.Tensor) -> float:
    return max(t.abs().max().item(), 1e-30)


def main(out: str, case: str, overrides: list[str]) -> None:
    env = init_distributed("cpu")
    try:
        cfg = load_config(REPO / "configs/tiny.yaml", [*MODEL, f"train.run_dir={out}/run", *overrides])
        layout = Layout.resolve(cfg, env.world_size)
        batch = window_batch(cfg.model.vocab_size) if case != "memory" else long_batch(cfg)
        module = build_torch_module(cfg, layout, env, None)
        module.train(False)  # (no dropout either way; eval mode keeps the comparison about attention)
        n = len(batch["input_ids"])
        rows = slice(module.dp_rank * n // layout.dp_size, (module.dp_rank + 1) * n // layout.dp_size)
        mine = {k: v[rows] for k, v in batch.items()}
        ((x, _, pos),) = module._micro_batches(mine, n_micro=1)
        if case == "leak":
            report = leak(module, layout, env.rank, mine, x, pos)
        elif case == "memory":
            report = saved_activations(cfg, module, layout, env.rank, x, pos)
        else:
            report = compare(cfg, module, layout, env.rank, batch, mine, rows, x, pos)
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"rank{env.rank}.json").write_text(json.dumps(report))
        del module
    finally:
        shutdown()


def compare(cfg, module, layout, rank, batch, mine, rows, x, pos) -> dict:
    ref_logits, ref_loss, ref_grads = reference(cfg, batch)
    with torch.no_grad():
        logits = distributed_logits(module, layout, rank, x, pos)
    report = {"logits": None if logits is None else (logits - ref_logits[rows]).abs().max().item() / scale_of(ref_logits)}
    tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    module.train(True)
    loss = module.train_batch(mine, module.grad_average_size / tokens)
    total = loss.detach().clone() if module.reports_loss else torch.zeros_like(loss)
    dist.all_reduce(total)
    report["loss"] = abs(total.item() - ref_loss.item()) / ref_loss.item()
    report["grads"] = {}
    for part in module.parts:
        for name, p in part.named_parameters():
            name = canonical_name(name)
            report["grads"][name] = (full(p.grad) - ref_grads[name]).abs().max().item() / scale_of(ref_grads[name])
    return report


def leak(module, layout, rank, mine, x, pos) -> dict:
    """Logits before and after changing one token of row 1's fourth document (positions 24..48: it crosses
    the edge between chunks 1 and 2, held by different cp ranks): the largest change inside that document
    from the changed token on, and outside it."""
    changed = {k: v.clone() for k, v in mine.items()}
    at = 30
    changed["input_ids"][1, at] = (changed["input_ids"][1, at] + 1) % module.parts[0].cfg.vocab_size
    ((x2, _, pos2),) = module._micro_batches(changed, n_micro=1)
    with torch.no_grad():
        before = distributed_logits(module, layout, rank, x, pos)
        after = distributed_logits(module, layout, rank, x2, pos2)
    if before is None:
        return {}
    diff = (after - before).abs().amax(-1)  # (rows, positions)
    inside = torch.zeros_like(diff, dtype=torch.bool)
    inside[1, at:24 + 25] = True
    return {"inside": diff[inside].max().item(), "outside": diff[~inside].max().item()}


def saved_activations(cfg, module, layout, rank, x, pos) -> dict:
    """Bytes the transformer blocks keep for the backward of this rank's share (distinct storages that autograd
    saves, parameters and views of them left out), next to the estimator's figure for them."""
    from megacore.parallel.estimate import block_activations

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if not (base.is_leaf and base.requires_grad):  # (a parameter, or FSDP's gathered one)
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def enter(block, args):
        block.saving = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        block.saving.__enter__()

    def leave(block, args, out):
        block.saving.__exit__(None, None, None)

    part = module.parts[0]
    for block in part.layers.values():
        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave)
    module.train(True)
    out = part(x, pos, return_hidden=True)
    from megacore.model.moe import moe_layers

    estimated = block_activations(cfg, layout, len(part.layers), layout.coordinates(rank)["cp"],
                                  moe_here=len(moe_layers(part)))
    del out
    return {"measured": sum(saved.values()), "estimated": estimated}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
