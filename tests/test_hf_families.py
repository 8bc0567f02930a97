"""Published model families in and out: for Llama 3 (rope_scaling llama3), Mistral, Qwen2 (q/k/v bias,
tied embeddings) and Qwen3 (q/k norm, explicit head_dim), a randomly initialised `transformers` model
saved sharded is imported with its config derived from config.json; our logits equal transformers'
within 1e-4 in fp32, the export loads back in transformers with the same logits, and greedy generation
of 20 tokens is the same in both."""

import json

import pytest
import torch

from megacore.checkpoint.hf import load_hf_into, read_hf_config, save_hf_weights
from megacore.checkpoint.hf_config import model_config_from_hf
from megacore.checkpoint.streaming import ModelWeights
from megacore.config import ConfigError, ModelConfig
from megacore.eval.generate import sample
from megacore.model import Llama

SHAPES = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
FAMILIES = {
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(sliding_window=None, rope_theta=1e6)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
}


def _published(name: str, path):
    import transformers

    cls, extra = FAMILIES[name]
    config = getattr(transformers, cls)(**SHAPES, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # every weight random, biases and norms included, so none is matched by luck
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path, max_shard_size="100KB", safe_serialization=True)
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_imports_and_exports_with_transformers_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM

    theirs = _published(name, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file(), "saved sharded"
    cfg = model_config_from_hf(read_hf_config(tmp_path / "hf"), ModelConfig(), tmp_path / "hf")
    ours = Llama(cfg).eval()
    load_hf_into(ours, tmp_path / "hf")
    ids = torch.randint(0, SHAPES["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-4), name

    (tmp_path / "out").mkdir()
    save_hf_weights(ModelWeights(ours), ours.cfg, tmp_path / "out", max_shard_bytes=60_000)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == \
        json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, ours(ids), atol=1e-4), name
        prompt = ids[:1, :8]
        generated = back.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    assert sample(ours, prompt[0].tolist(), 20, temperature=0, stop_ids=_stops(back)) == generated


@pytest.mark.parametrize("change, named", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"sliding_window": 64}, "sliding_window=64"),
    ({"quantization_config": {"bits": 4}}, "quantization_config"),
])
def test_a_field_we_do_not_implement_is_refused_by_name(change, named, tmp_path):
    config = {"model_type": "mistral", **SHAPES, **change}
    with pytest.raises(ConfigError, match=named):
        model_config_from_hf(config, ModelConfig(), tmp_path)


def _stops(model) -> set[int]:
    """The ids at which transformers' generate stops (its generation config's EOS), for ours to stop alike."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def test_a_streamed_safetensors_file_is_the_one_safetensors_writes(tmp_path):
    """export-hf writes safetensors tensor by tensor (megacore/checkpoint/safetensors_stream.py): for every
    dtype it writes, mixed, names out of order, a scalar and an empty tensor, the bytes equal save_file's."""
    from safetensors.torch import save

    from megacore.checkpoint.safetensors_stream import TensorSpec, write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"model.layers.10.w": torch.randn(4, 3, generator=g), "model.layers.2.w": torch.randn(5, generator=g),
               "a.bf16": torch.randn(3, 2, generator=g).bfloat16(), "h": torch.randn(7, generator=g).half(),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "lm_head.weight": torch.randn(2, 9, generator=g)}
    write_safetensors(tmp_path / "x.safetensors", [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                      tensors.__getitem__, metadata={"format": "pt"})
    assert (tmp_path / "x.safetensors").read_bytes() == save(tensors, metadata={"format": "pt"})
