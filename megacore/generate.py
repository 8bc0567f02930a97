"""Loading a trained model on one process, and sampling text from it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from data_pipeline.shards import TOKENIZER
from data_pipeline.tokenizer import Tokenizer
from megacore.checkpoint import load_model_weights, resolve_checkpoint
from megacore.config import Config
from megacore.model import Llama
from megacore.model.llama import KVCache
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
           top_k: int = 0, top_p: float = 1.0, stop_ids: Iterable[int] = (),
           generator: torch.Generator | None = None, use_cache: bool = True) -> list[int]:
    """Autoregressive sampling; temperature 0 is greedy. Returns only the new tokens, ending with a stop
    token if one was drawn. With the KV cache each new token costs one position's forward; when the
    context is full the window slides and the cache is rebuilt from the last max_seq_len tokens,
    exactly as the uncached path sees them."""
    device = next(model.parameters()).device
    context, stop_ids = model.cfg.max_seq_len, set(stop_ids)
    tokens: list[int] = list(prompt_ids)
    new: list[int] = []
    cache, fed = None, 0  # fed: how many of `tokens` the cache holds
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(torch.tensor([tokens[-context:]], device=device))[0, -1].float()
        else:
            if cache is None or cache.length >= context:
                window = tokens[-context:]
                cache = KVCache(model, 1, context, device, next(model.parameters()).dtype)
                pending, fed = window, len(tokens)
            else:
                pending, fed = tokens[fed:], len(tokens)
            logits = model(torch.tensor([pending], device=device), cache=cache)[0, -1].float()
        next_id = _draw(logits, temperature, top_k, top_p, generator)
        new.append(next_id)
        tokens.append(next_id)
        if next_id in stop_ids:
            break
    return new


def _draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
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
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
