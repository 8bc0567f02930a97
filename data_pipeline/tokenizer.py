"""Tokenizers: our SentencePiece model (trained on the corpus), and a published model's Hugging Face
`tokenizer.json` (byte-level BPE as in Llama 3 and Qwen, through the `tokenizers` library) with its
`tokenizer_config.json` (special tokens) and chat template (read where transformers reads it:
`chat_template.jinja`, `additional_chat_templates/`, or the config's `chat_template` field). Both give
the same interface: ids of text without special tokens, exact decoding, BOS/EOS/pad ids, the id of a
special piece, and the files that make up the tokenizer (copied with the data and the run, keeping
their places in the directory, and hashed together into its sha256).

`load_tokenizer(path)` takes a file, a data or run directory, or a published model's directory.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_pipeline.durable import atomic_write, read_json_object
from data_pipeline.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
DEFAULT_CHARACTER_COVERAGE = 0.9995  # sentencepiece's
# Reserved now so that chat fine-tuning later needs no new vocabulary.
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def train_tokenizer(documents: list[str], out_path: Path, vocab_size: int, model_type: str = "bpe",
                    character_coverage: float | None = None, log=print) -> Tokenizer:
    """Train on `documents` and write the model atomically to `out_path`. With character_coverage None,
    sentencepiece's default, unless the characters that covers leave the vocabulary no room: then the
    coverage of the most frequent characters that fill half of it (`coverage_that_fits`), said in `log`."""
    model = io.BytesIO()
    coverage, kept = (DEFAULT_CHARACTER_COVERAGE if character_coverage is None else character_coverage), None
    while True:
        try:
            _train(documents, model, vocab_size, model_type, coverage)
            break
        except RuntimeError as e:
            reason = str(e).split("] ")[-1].split(" Increase vocab_size")[0]
            sizes = re.search(r"required_chars\. (\d+) vs (\d+)", reason)
            if character_coverage is not None or sizes is None or (kept is not None and kept <= 1):
                hint = (" (raise data.vocab_size, or lower data.character_coverage, e.g. to 0.99, or leave it unset "
                        "for megacore to choose: the remaining characters are spelled in bytes)" if sizes else "")
                raise DataError(f"tokenizer training failed for data.vocab_size={vocab_size}, data.character_coverage="
                                f"{coverage}: {reason}{hint}") from None
            # sentencepiece counts characters in its own sample: if it still needs more pieces, keep fewer.
            room = None if kept is None else kept - (int(sizes[2]) - int(sizes[1]))
            coverage, kept, distinct = coverage_that_fits(documents, vocab_size, room)
    if kept is not None:
        log(f"data.character_coverage is not set, and the {distinct:,} distinct characters of the tokenizer sample "
            f"need more pieces than data.vocab_size={vocab_size} holds at sentencepiece's default "
            f"{DEFAULT_CHARACTER_COVERAGE}: used {coverage:.6g} (the {kept:,} most frequent characters; rarer ones "
            f"are spelled in UTF-8 bytes, and decoding stays exact)")
    with atomic_write(out_path, "wb") as f:
        f.write(model.getvalue())
    return Tokenizer(out_path)


# Pieces sentencepiece reserves before any character: unk, bos, eos, pad, the chat tokens, 256 bytes.
RESERVED_PIECES = 4 + len(CHAT_TOKENS) + 256


def coverage_that_fits(documents: list[str], vocab_size: int, room: int | None = None) -> tuple[float, int, int]:
    """(character_coverage, characters kept, distinct characters). sentencepiece keeps the most frequent
    characters until their share of all characters reaches the coverage; here they may fill `room`
    pieces, by default half of those left after the reserved ones, so that the other half holds merges
    (words, frequent pairs): a rare character dropped costs its few occurrences a few byte pieces each."""
    counts = collections.Counter()
    for document in documents:  # (counted in C, a document at a time: seconds for a whole tokenizer sample)
        counts.update(document)
    frequencies = sorted(counts.values(), reverse=True)
    kept = min((vocab_size - RESERVED_PIECES) // 2 if room is None else room, len(frequencies))
    if kept < 1:
        raise DataError(f"data.vocab_size={vocab_size} leaves no pieces for characters after the "
                        f"{RESERVED_PIECES} reserved ones; raise data.vocab_size")
    share = float(np.cumsum(frequencies, dtype=np.float64)[kept - 1] / sum(frequencies))
    # sentencepiece stops adding characters once their share (a double) reaches the coverage (a float32):
    # the largest float32 not above the share of the kept ones stops right after them.
    coverage = np.float32(share)
    if coverage > share:
        coverage = np.nextafter(coverage, np.float32(0))
    return float(coverage), kept, len(frequencies)


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


HF_TOKENIZER, HF_TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
SENTENCEPIECE = "tokenizer.model"
# Where transformers (5.x) keeps chat templates: files first, then tokenizer_config.json's field.
CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"
CHAT_TEMPLATE_PLACES = (CHAT_TEMPLATE_FILE, f"{CHAT_TEMPLATE_DIR}/*.jinja",
                        f"the chat_template field of {HF_TOKENIZER_CONFIG}")


def read_chat_templates(directory: Path, config: dict) -> tuple[dict[str, str], list[Path]]:
    """(name -> template, the template files) of a tokenizer directory, as transformers' tokenizers load
    them: `chat_template.jinja` ("default") and `additional_chat_templates/NAME.jinja` take priority over
    tokenizer_config.json's `chat_template`, a string ("default") or a list of {"name", "template"}."""
    files = [directory / CHAT_TEMPLATE_FILE] if (directory / CHAT_TEMPLATE_FILE).is_file() else []
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        files += sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja"))
    if files:
        return {("default" if f.name == CHAT_TEMPLATE_FILE else f.name.removesuffix(".jinja")):
                f.read_text(encoding="utf-8") for f in files}, files
    field = config.get("chat_template")
    if isinstance(field, list):
        return {t["name"]: t["template"] for t in field}, []
    return ({"default": field} if field else {}), []


def copy_tokenizer(tokenizer, dest: Path) -> None:
    """The tokenizer's files into directory `dest`, each at its place relative to the tokenizer's directory
    (a published model's additional chat templates keep their folder), so that `dest` loads the same."""
    for name in tokenizer.file_names:
        source, target = tokenizer.directory / name, Path(dest) / name
        if source.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


def load_tokenizer(path: str | Path):
    """The tokenizer of a file or directory: a prepared data directory's (its manifest names it), else a
    Hugging Face tokenizer.json (with tokenizer_config.json) if present, else tokenizer.model."""
    path = Path(path)
    if path.is_dir():
        from data_pipeline.shards import MANIFEST, read_manifest  # (shards imports this module)
        if (path / MANIFEST).is_file():
            # (A data directory's own tokenizer.json, if any, is the record of how its tokenizer was trained.)
            return load_tokenizer(path / read_manifest(path)["tokenizer"]["file"])
        if (path / HF_TOKENIZER).is_file():
            return HFTokenizer(path)
        path = path / SENTENCEPIECE
    if path.name == HF_TOKENIZER:
        return HFTokenizer(path.parent)
    return Tokenizer(path)


class Tokenizer:
    """A sentencepiece model: ours (no chat template: data_pipeline/chat.py's own, with the reserved
    tokens), or a published model's tokenizer.model, whose tokenizer_config.json and chat template files
    beside it, when it has a chat template, become part of the tokenizer."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path, self.directory = path, path.parent
        config_path = path.parent / HF_TOKENIZER_CONFIG
        config = read_json_object(config_path, DataError, "a tokenizer config") if config_path.is_file() else {}
        self.chat_templates, template_files = read_chat_templates(self.directory, config)
        # The config is part of the tokenizer only with a chat template (export-hf writes one without: the
        # tokenizer stays the model file, with its hash).
        with_template = [config_path] if self.chat_templates and config_path.is_file() else []
        self.files = [path, *with_template, *template_files]
        data = path.read_bytes()
        self.sha256 = hashlib.sha256(b"".join(f.read_bytes() for f in self.files)).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=data)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.add_bos = config.get("add_bos_token") is True  # (as transformers encodes: downstream tasks)
        self.chat_template = self.chat_templates.get("default")
        self.special = {name: self.sp.id_to_piece(i) if i >= 0 else None
                        for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                                        ("pad_token", self.pad_id), ("unk_token", self.sp.unk_id()))}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_as_published(self, text: str) -> list[int]:
        """As transformers' tokenizer encodes it by default: ours adds no BOS (our export says
        add_bos_token false); a published directory's tokenizer_config.json may say true."""
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if self.add_bos and self.bos_id >= 0 else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    @property
    def file_names(self) -> list[str]:
        return [str(f.relative_to(self.directory)) for f in self.files]

    def spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, (start, end) character span of each) of `text` (for chat templates' loss masks)."""
        proto = self.sp.encode(text, out_type="immutable_proto")
        # sentencepiece gives byte offsets; the templates' spans are in characters.
        char_of = [0] * (len(text.encode("utf-8")) + 1)
        position = 0
        for i, ch in enumerate(text):
            for _ in range(len(ch.encode("utf-8"))):
                char_of[position] = i
                position += 1
        char_of[position] = len(text)
        return [p.id for p in proto.pieces], [(char_of[p.begin], char_of[p.end]) for p in proto.pieces]

    def encode_batch(self, texts: list[str], add_eos: bool = False) -> list[list[int]]:
        return self.sp.encode(texts, add_eos=add_eos, num_threads=1)  # (prepare's workers are the parallelism)

    def token_id(self, piece: str) -> int | None:
        pid = self.sp.piece_to_id(piece)
        return None if pid == self.sp.unk_id() else pid



class HFTokenizer:
    """A published model's tokenizer.json, with the special tokens of its tokenizer_config.json and its chat
    template. Text is encoded without special tokens (documents get EOS from the loader's rules, chat data
    from the template)."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer as Backend

        self.directory = Path(directory)
        self.path = self.directory / HF_TOKENIZER
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {self.path}")
        config_path = self.directory / HF_TOKENIZER_CONFIG
        config = read_json_object(config_path, DataError, "a tokenizer config") if config_path.is_file() else {}
        self.chat_templates, template_files = read_chat_templates(self.directory, config)
        self.files = [self.path, *([config_path] if config_path.is_file() else []), *template_files]
        self.backend = Backend.from_file(str(self.path))
        self.sha256 = hashlib.sha256(b"".join(f.read_bytes() for f in self.files)).hexdigest()
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = self.chat_templates.get("default")
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_id = self._id(self.special["bos_token"])
        self.eos_id = self._id(self.special["eos_token"])
        self.pad_id = self._id(self.special["pad_token"])
        if self.eos_id is None:
            raise DataError(f"{config_path}: no eos_token that {self.path} knows: documents need an end-of-text id")
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
        self.bos_id = -1 if self.bos_id is None else self.bos_id
        self.add_bos = config.get("add_bos_token") is True

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def file_names(self) -> list[str]:
        return [str(f.relative_to(self.directory)) for f in self.files]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_as_published(self, text: str) -> list[int]:
        """As transformers' tokenizer encodes it by default: with the special tokens the tokenizer's
        post-processor adds (Llama 3's BOS; none for Qwen), and BOS where tokenizer_config.json says
        add_bos_token and the post-processor did not: what evaluation harnesses score."""
        ids = self.backend.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_id >= 0 and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: list[str], add_eos: bool = False) -> list[list[int]]:
        out = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return [ids + [self.eos_id] for ids in out] if add_eos else out

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    def spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, (start, end) character span of each) of `text` (for chat templates' loss masks)."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or {"content": ...} (AddedToken)."""
    return value.get("content") if isinstance(value, dict) else value
