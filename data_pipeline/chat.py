"""Chat and instruction data: records -> conversations -> tokens with a per-token loss mask.

Accepted JSONL records: {"prompt": ..., "response": ...} or {"messages": [{"role", "content"}, ...]}
with roles system, user and assistant. The template uses the tokenizer's reserved special tokens:

    <|system|>You are ...<|end|><|user|>Hello<|end|><|assistant|>Hi there<|end|>  (then EOS)

Only what the assistant says is trained: its content and the <|end|> that closes it (so the model
learns to stop) have loss weight 1; everything else, the role tokens included, is context (0).
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant")
END = "<|end|>"


class ChatFormatError(ValueError):
    pass


def conversation(record, where: str) -> list[dict]:
    """Validated [{"role", "content"}] of one record; errors name the file and line (`where`)."""
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(f"{where}: a chat record needs string fields prompt and response, or a non-empty "
                              f"list messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatFormatError(f"{where}: messages[{i}] needs role in {ROLES} and string content, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatFormatError(f"{where}: no assistant message: nothing to train on")
    return out


def special_id(sp, piece: str) -> int:
    pid = sp.piece_to_id(piece)
    if pid == sp.unk_id():
        raise ChatFormatError(f"the tokenizer has no {piece} token (prepare it with megacore, which reserves them)")
    return pid


def render(sp, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation, EOS appended (weight 0)."""
    ids, mask = [], []
    end = special_id(sp, END)
    for m in messages:
        content = sp.encode(m["content"])
        trained = 1 if m["role"] == "assistant" else 0
        ids += [special_id(sp, f"<|{m['role']}|>"), *content, end]
        mask += [0, *[trained] * len(content), trained]
    return ids + [sp.eos_id()], mask + [0]


def prompt(sp, messages: list[dict]) -> list[int]:
    """Token ids that ask for the next assistant turn (for generation)."""
    ids = []
    for m in messages:
        ids += [special_id(sp, f"<|{m['role']}|>"), *sp.encode(m["content"]), special_id(sp, END)]
    return ids + [special_id(sp, "<|assistant|>")]


def contents(document: str) -> str:
    """The text of a stored conversation (canonical JSON), for tokenizer training."""
    return "\n".join(m["content"] for m in json.loads(document))
