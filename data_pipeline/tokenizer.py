"""SentencePiece tokenizer: training on documents, and a small wrapper used by the loader and the model."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from data_pipeline.durable import atomic_write

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
DEFAULT_CHARACTER_COVERAGE = 0.9995  # sentencepiece's
# Reserved now so that chat fine-tuning later needs no new vocabulary.
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def train_tokenizer(documents: Iterable[str], out_path: Path, vocab_size: int, model_type: str = "bpe",
                    character_coverage: float = DEFAULT_CHARACTER_COVERAGE) -> Tokenizer:
    """Train on `documents` and write the model atomically to `out_path`."""
    model = io.BytesIO()
    try:
        _train(documents, model, vocab_size, model_type, character_coverage)
    except RuntimeError as e:
        reason = str(e).split("] ")[-1].split(" Increase vocab_size")[0]
        hint = (" (raise data.vocab_size, or lower data.character_coverage, e.g. to 0.99: the remaining "
                "characters are spelled in bytes)" if "required_chars" in reason else "")
        raise ValueError(f"tokenizer training failed for data.vocab_size={vocab_size}, data.character_coverage="
                         f"{character_coverage}: {reason}{hint}") from None
    with atomic_write(out_path, "wb") as f:
        f.write(model.getvalue())
    return Tokenizer(out_path)


def _train(documents: Iterable[str], model: io.BytesIO, vocab_size: int, model_type: str,
           character_coverage: float) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        # Identity normalisation, kept whitespace and byte fallback make decode(encode(x)) == x,
        # indentation and newlines included.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        # A corpus too small for vocab_size gets a smaller vocabulary instead of an abort.
        hard_vocab_limit=False,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        user_defined_symbols=CHAT_TOKENS,
        max_sentence_length=1 << 20,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
        # Given only when it is not sentencepiece's default: a field set explicitly is stored in the model,
        # which would change the tokenizer's bytes (and so every dataset fingerprint) for the same pieces.
        **({} if character_coverage == DEFAULT_CHARACTER_COVERAGE else {"character_coverage": character_coverage}),
    )


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        data = path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=data)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])
