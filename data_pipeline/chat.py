"""Chat and instruction data: records -> conversations -> tokens with a per-token loss mask.

Accepted JSONL records: {"prompt": ..., "response": ...} or {"messages": [{"role", "content"}, ...]}
with roles system, user and assistant. Our own template (for tokenizers megacore trains) uses the
tokenizer's reserved special tokens:

    <|system|>You are ...<|end|><|user|>Hello<|end|><|assistant|>Hi there<|end|>  (then EOS)

A published model's tokenizer brings its own chat template (Jinja: `chat_template.jinja`, or the
`chat_template` of tokenizer_config.json; data_pipeline/tokenizer.py reads it where transformers does),
which is rendered as `transformers`' apply_chat_template renders it; the ids are those of the rendered text.
A tokenizer with neither a template nor megacore's reserved tokens is refused before anything is written.

The loss mask, either way: only what the assistant says is trained, its content and the end-of-turn
marker that closes it (so the model learns to stop) have weight 1; everything else, the role markers
included, is context (0). With a template, assistant turn i spans the characters from the end of the
conversation rendered up to it with the generation prompt to the end of the conversation rendered
through it; a token is trained when its characters lie in such a span.
"""

from __future__ import annotations

import json

from data_pipeline.errors import ChatFormatError
from data_pipeline.tokenizer import CHAT_TEMPLATE_PLACES

ROLES = ("system", "user", "assistant")
END = "<|end|>"


def check_chat_tokenizer(tokenizer, what: str) -> None:
    """Refuse, before anything is written, a tokenizer that cannot render a conversation: one with no chat
    template (looked for where transformers looks) that is not a megacore tokenizer with the reserved
    tokens. A template that does not compile is refused too. `what` names the setting that chose it."""
    if tokenizer.chat_template:
        _compiled(tokenizer.chat_template)
        return
    if all(tokenizer.token_id(piece) is not None for piece in (*(f"<|{r}|>" for r in ROLES), END)):
        return
    named = (f" (it has templates {sorted(tokenizer.chat_templates)}, none named 'default')"
             if tokenizer.chat_templates else "")
    raise ChatFormatError(
        f"{what}: the tokenizer in {tokenizer.directory} has no chat template{named}: looked at "
        f"{', '.join(CHAT_TEMPLATE_PLACES)} there. Use a chat model's tokenizer (its chat_template.jinja), "
        f"add a template (tokenizer.chat_template = ...; tokenizer.save_pretrained(DIR) in transformers), or "
        f"prepare with a tokenizer megacore trains (it reserves {', '.join(f'<|{r}|>' for r in ROLES)} and {END})")


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


def special_id(tokenizer, piece: str) -> int:
    pid = tokenizer.token_id(piece)
    if pid is None:
        raise ChatFormatError(f"the tokenizer in {tokenizer.directory} has no chat template and no {piece} token "
                              f"(megacore's own tokenizers reserve it)")
    return pid


def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation, EOS appended (weight 0) unless the template ends with it."""
    if tokenizer.chat_template:
        ids, mask = _render_template(tokenizer, messages)
        return (ids, mask) if ids and ids[-1] == tokenizer.eos_id else (ids + [tokenizer.eos_id], mask + [0])
    ids, mask = [], []
    end = special_id(tokenizer, END)
    for m in messages:
        content = tokenizer.encode(m["content"])
        trained = 1 if m["role"] == "assistant" else 0
        ids += [special_id(tokenizer, f"<|{m['role']}|>"), *content, end]
        mask += [0, *[trained] * len(content), trained]
    return ids + [tokenizer.eos_id], mask + [0]


def prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids that ask for the next assistant turn (for generation)."""
    if tokenizer.chat_template:
        return tokenizer.encode(apply_template(tokenizer, messages, add_generation_prompt=True))
    ids = []
    for m in messages:
        ids += [special_id(tokenizer, f"<|{m['role']}|>"), *tokenizer.encode(m["content"]), special_id(tokenizer, END)]
    return ids + [special_id(tokenizer, "<|assistant|>")]


def stop_ids(tokenizer) -> set[int]:
    """Ids that end an assistant turn: EOS, and the template's end-of-turn token (<|end|> for ours)."""
    if not tokenizer.chat_template:
        return {special_id(tokenizer, END), tokenizer.eos_id}
    turn = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    start = len(apply_template(tokenizer, turn[:1], add_generation_prompt=True)) + len("y")
    ids = tokenizer.encode(apply_template(tokenizer, turn)[start:])  # what the template puts after the turn
    return {tokenizer.eos_id, *ids[:1]}


def apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template rendered as transformers renders it (sandboxed Jinja, trim_blocks, lstrip_blocks,
    loop controls, raise_exception, the special tokens as variables)."""
    return _compiled(tokenizer.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                      tools=None, documents=None, **tokenizer.special)


def _render_template(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    text = apply_template(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = apply_template(tokenizer, messages[:i], add_generation_prompt=True)
        through = apply_template(tokenizer, messages[:i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise ChatFormatError("the chat template renders a conversation's beginning differently from the whole "
                                  "conversation: the assistant's tokens cannot be located for the loss mask")
        spans.append((len(before), len(through)))
    ids, offsets = tokenizer.spans(text)
    mask = [int(any(lo <= s and e <= hi for lo, hi in spans)) for s, e in offsets]
    return ids, mask


_TEMPLATES: dict[str, object] = {}


def _compiled(template: str):
    if template not in _TEMPLATES:
        from datetime import datetime

        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatFormatError(f"the chat template refused the conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        try:
            _TEMPLATES[template] = env.from_string(template)
        except TemplateError as e:
            raise ChatFormatError(f"the tokenizer's chat_template does not compile: {e}") from None
    return _TEMPLATES[template]


def contents(document: str) -> str:
    """The text of a stored conversation (canonical JSON), for tokenizer training."""
    return "\n".join(m["content"] for m in json.loads(document))
