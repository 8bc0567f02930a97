"""Hugging Face format: export a checkpoint as a `LlamaForCausalLM` directory, and read one back.

The directory holds model.safetensors, config.json (LlamaConfig), and the sentencepiece tokenizer
(tokenizer.model with tokenizer_config.json and special_tokens_map.json). Our RoPE already uses the
rotate-half layout of `transformers`, so weights map by name with no permutation. Loading reads
safetensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data_pipeline.tokenizer import Tokenizer
from megacore.config import ConfigError, ModelConfig
from megacore.model.llama import Llama, ffn_hidden_dim

_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def to_hf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"


def from_hf_name(name: str) -> str | None:
    for ours, theirs in _TOP.items():
        if name == theirs:
            return ours
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:
        for ours, theirs in _LAYER.items():
            if m.group(2) == theirs:
                return f"layers.{m.group(1)}.{ours}"
    return None


def hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": ffn_hidden_dim(cfg), "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim // cfg.n_heads, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "attention_dropout": cfg.dropout, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
    }


def export_hf(model: Llama, tokenizer: Tokenizer, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {to_hf_name(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg), indent=2))
    shutil.copyfile(tokenizer.path, out / "tokenizer.model")
    sp = tokenizer.sp
    special = {"bos_token": sp.id_to_piece(tokenizer.bos_id), "eos_token": sp.id_to_piece(tokenizer.eos_id),
               "unk_token": sp.id_to_piece(sp.unk_id()), "pad_token": sp.id_to_piece(tokenizer.pad_id)}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        # Our sentencepiece model adds the dummy "▁" prefix; add_prefix_space makes transformers'
        # tokenizer encode and decode exactly as we do.
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": False,
        "add_prefix_space": True, "model_max_length": model.cfg.max_seq_len, **special}, indent=2))
    return out


def read_hf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, our-named state dict) of a Hugging Face Llama directory."""
    path = Path(path)
    config = read_hf_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    state = {}
    for f in files:
        for name, tensor in load_file(str(f)).items():
            ours = from_hf_name(name)
            if ours is None:
                raise ValueError(f"{f}: unexpected tensor {name!r} for a Llama model")
            state[ours] = tensor
    if config.get("tie_word_embeddings") and "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    return config, state


# config.json fields whose value changes the computation, and what this model computes. A field that is
# absent means the family's default (transformers' LlamaConfig), which is what we implement.
_IMPLEMENTED = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                "rope_scaling": None, "sliding_window": None, "use_sliding_window": False, "pretraining_tp": 1}


def check_hf_config(config: dict, cfg: ModelConfig, source: str | Path) -> None:
    """Refuse a Hugging Face model this run's model would not reproduce: other shapes, another RoPE base
    or norm epsilon (both values named), or a feature we do not implement (named, never dropped)."""
    expected = hf_config(cfg)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "head_dim", "tie_word_embeddings"):
        theirs = config.get(key, {"head_dim": expected["head_dim"], "tie_word_embeddings": False}.get(key))
        if theirs != expected[key]:
            raise ConfigError(f"train.init_from={source}: config.json has {key}={theirs}, this run's model has "
                              f"{expected[key]}")
    for key, ours in (("rope_theta", cfg.rope_theta), ("rms_norm_eps", cfg.norm_eps)):
        theirs = config.get(key, 10000.0 if key == "rope_theta" else 1e-6)
        if float(theirs) != float(ours):
            name = "model.rope_theta" if key == "rope_theta" else "model.norm_eps"
            raise ConfigError(f"train.init_from={source}: config.json has {key}={theirs}, this run has "
                              f"{name}={ours}; set {name}={theirs}")
    for key, value in _IMPLEMENTED.items():
        if key in config and config[key] != value and not (value is False and config[key] is None):
            raise ConfigError(f"train.init_from={source}: config.json has {key}={config[key]!r}, which megacore's "
                              f"Llama does not implement (it computes {key}={value!r})")


def read_hf_config(path: str | Path) -> dict:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {path}")
    return json.loads(config_path.read_text())


def _hf_tensor_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (from model.safetensors.index.json when sharded);
    reads headers only."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            out.update({name: f for name in handle.keys()})
    return out


def load_hf_slices(parts: list, path: str | Path) -> None:
    """train.init_from=HF_DIR into parallelized model parts: each rank reads only the slices of each
    tensor that its shards hold (safetensors slices; nothing else is read), converted to fp32."""
    from megacore.parallel.materialize import load_slices

    path = Path(path)
    config, files = read_hf_config(path), _hf_tensor_files(path)
    for name in files:
        if from_hf_name(name) is None:
            raise ValueError(f"{files[name]}: unexpected tensor {name!r} for a Llama model")
    handles: dict[Path, object] = {}

    def read(name: str, shape: tuple, offset: tuple, local: tuple) -> torch.Tensor:
        theirs = to_hf_name(name)
        if theirs not in files and name == "output.weight" and config.get("tie_word_embeddings"):
            theirs = to_hf_name("tok_embeddings.weight")
        if theirs not in files:
            raise ValueError(f"{path}: missing weight {theirs} (for {name})")
        f = files[theirs]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        piece = handles[f].get_slice(theirs)
        if tuple(piece.get_shape()) != tuple(shape):
            raise ValueError(f"{f}: {theirs} has shape {tuple(piece.get_shape())}, the model needs {tuple(shape)}")
        return piece[tuple(slice(o, o + n) for o, n in zip(offset, local))].to(torch.float32)

    load_slices(parts, read)


def load_hf_into(model: Llama, path: str | Path) -> None:
    """Initialise `model` from a Hugging Face directory whose config.json describes this model."""
    config, state = read_hf(path)
    check_hf_config(config, model.cfg, path)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ValueError(f"{path}: missing weights {sorted(missing)[:5]}")
    with torch.no_grad():
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
