"""Loading a trained model on one process, and sampling text from it."""

from __future__ import annotations

from pathlib import Path

import torch

from data_pipeline.shards import TOKENIZER
from data_pipeline.tokenizer import Tokenizer
from megacore.checkpoint import load_model_weights, resolve_checkpoint
from megacore.config import Config
from megacore.model import Llama
from megacore.run_dir import load_run_config


def load_trained(path: str | Path, device: str = "cpu") -> tuple[Llama, Tokenizer, Config, Path]:
    """Model (eval mode), tokenizer and config from a run directory or one of its checkpoints.

    DCP reshards on load, so a checkpoint written by any number of ranks loads into one process.
    """
    ckpt = resolve_checkpoint(path)
    run_dir = ckpt.parent.parent
    cfg = load_run_config(run_dir)
    tokenizer = Tokenizer(run_dir / TOKENIZER)
    with torch.device(device):
        model = Llama(cfg.model)
    load_model_weights(model, ckpt)
    return model.eval(), tokenizer, cfg, ckpt


@torch.no_grad()
def sample(model: Llama, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
           generator: torch.Generator | None = None) -> list[int]:
    """Autoregressive sampling; temperature 0 is greedy. Returns only the new tokens."""
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    context = model.cfg.max_seq_len
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -context:])[0, -1].float()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = float("-inf")
            if top_p < 1.0:
                sorted_logits, order = torch.sort(logits, descending=True)
                cumulative = sorted_logits.softmax(-1).cumsum(-1)
                # Drop tokens once the mass before them already reaches top_p (the first always stays).
                drop = cumulative - sorted_logits.softmax(-1) >= top_p
                logits[order[drop]] = float("-inf")
            next_id = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        new.append(next_id)
        if eos_id is not None and next_id == eos_id:
            break
        tokens = torch.cat([tokens, torch.tensor([[next_id]], device=device)], dim=1)
    return new
