"""Sampling text from a trained model: plain continuation or one chat turn (`megacore generate`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from data_pipeline import chat
from data_pipeline.tokenizer import Tokenizer
from megacore.errors import ConfigError
from megacore.model import Llama
from megacore.model.llama import KVCache


@torch.no_grad()
def sample(model: Llama, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 1.0, stop_ids: Iterable[int] = (),
           generator: torch.Generator | None = None, use_cache: bool = True, agree=None) -> list[int]:
    """Autoregressive sampling; temperature 0 is greedy. Returns only the new tokens, ending with a stop
    token if one was drawn. With the KV cache each new token costs one position's forward; when the
    context is full the window slides and the cache is rebuilt from the last max_seq_len tokens,
    exactly as the uncached path sees them. `agree(token)`: the token every rank takes (a sharded model:
    megacore/eval/sharded.py)."""
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
        if agree is not None:
            next_id = agree(next_id)
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


def generate_text(model: Llama, tokenizer: Tokenizer, prompt: str, *, chat_turn: bool = False,
                  stop: Iterable[str] = (), max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
                  top_p: float = 0.95, seed: int = 0, use_cache: bool = True, agree=None) -> str:
    """The prompt and its continuation; or, with chat_turn, the assistant's reply to `prompt` as one user
    turn of the chat template (ours, or a published tokenizer's), ending at its end-of-turn token (or EOS)."""
    if chat_turn:
        chat.check_chat_tokenizer(tokenizer, "generate --chat")
        prompt_ids = chat.prompt(tokenizer, [{"role": "user", "content": prompt}])
        stop_ids = chat.stop_ids(tokenizer)
    else:
        # Training documents are separated by EOS, so an empty prompt starts "at a document boundary".
        prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
        stop_ids = {tokenizer.token_id(piece) for piece in stop}
        if None in stop_ids:
            raise ConfigError(f"--stop {list(stop)}: each must be one token of this tokenizer, e.g. '<|end|>'")
    new = sample(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, stop_ids=stop_ids,
                 generator=torch.Generator().manual_seed(seed), use_cache=use_cache, agree=agree)
    if new and new[-1] in stop_ids:
        new = new[:-1]
    return tokenizer.decode(new) if chat_turn else prompt + tokenizer.decode(new)
