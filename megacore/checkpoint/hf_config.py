"""Hugging Face `config.json` <-> our ModelConfig, for the Llama, Mistral, Qwen2 and Qwen3 families and the
mixtures of experts Qwen3-MoE and Mixtral.

`model_config_from_hf` derives the whole model section from a directory's config.json (shapes, head
size, RoPE base and scaling, norm epsilon, biases, q/k norms, tied embeddings); a field that changes the
computation and that our Llama does not implement is refused by name, never dropped. `hf_config`
writes the config of the family a model came from, so `transformers` rebuilds the same architecture.
Both transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`) spellings are read, and
Qwen3-MoE's expert count as `num_experts` or `num_local_experts` (transformers 5 writes the latter).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megacore.config import ConfigError, ModelConfig
from megacore.model.llama import ffn_hidden_dim
from megacore.model.moe import moe_hidden_dim

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
MOE_FAMILIES = ("qwen3_moe", "mixtral")

# The fields that define the architecture: what config.json decides, and what a model.* override may not
# contradict.
ARCHITECTURE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "head_dim", "norm_eps",
                       "rope_theta", "max_seq_len", "tie_embeddings", "qkv_bias", "qk_norm", "rope_scaling",
                       "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                       "rope_original_max_seq_len", "family", "n_experts", "n_active_experts", "moe_ffn_dim",
                       "moe_every", "moe_dense_layers", "moe_norm_topk")

def effective(cfg: ModelConfig, field: str):
    """The value of an architecture field as the model uses it (ffn_dim 0 and head_dim 0 are derived)."""
    if field == "ffn_dim":
        return ffn_hidden_dim(cfg)
    if field == "head_dim":
        return cfg.head_size
    if field == "moe_ffn_dim":
        return moe_hidden_dim(cfg) if cfg.moe else 0
    if field == "moe_dense_layers":
        return sorted(cfg.moe_dense_layers)
    return getattr(cfg, field)


# Read below, or no effect on the computation (token ids, initialisation of a fresh model, bookkeeping).
_READ = {"model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "vocab_size", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
         "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "hidden_act", "attention_bias",
         "mlp_bias", "pretraining_tp", "sliding_window", "use_sliding_window", "layer_types", "max_window_layers",
         # mixtures of experts
         "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
         "mlp_only_layers", "norm_topk_prob", "router_jitter_noise"}
_NO_EFFECT = {"_name_or_path", "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
              "chunk_size_feed_forward", "dtype", "torch_dtype", "id2label", "label2id", "initializer_range",
              "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type", "return_dict",
              "transformers_version", "use_cache", "tokenizer_class",
              # the auxiliary loss of transformers' training, not of the model (ours: model.moe_aux_loss_coef)
              "output_router_logits", "router_aux_loss_coef"}


def _refuse(source, key: str, value, why: str = "which megacore's Llama does not implement"):
    raise ConfigError(f"train.init_from={source}: config.json has {key}={value!r}, {why}")


def _rope(config: dict, source) -> dict:
    """RoPE base and scaling from either spelling, as ModelConfig fields."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    merged = {**scaling, **params}
    out = {"rope_theta": float(theta)}
    if kind == "default":
        return {**out, "rope_scaling": "none"}
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_scaling_factor": float(merged["factor"])}
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_scaling_factor": float(merged["factor"]),
                "rope_low_freq_factor": float(merged.get("low_freq_factor", 1.0)),
                "rope_high_freq_factor": float(merged.get("high_freq_factor", 4.0)),
                "rope_original_max_seq_len": int(merged.get("original_max_position_embeddings", 8192))}
    key = "rope_parameters.rope_type" if config.get("rope_parameters") else "rope_scaling"
    _refuse(source, key, kind if key.endswith("rope_type") else scaling,
            "a RoPE scaling megacore does not implement (it has: linear, llama3)")


def model_config_from_hf(config: dict, base: ModelConfig, source: str | Path) -> ModelConfig:
    """The model a Hugging Face config.json describes; training-only fields (dropout, init, document
    masking) come from `base`."""
    family = config.get("model_type")
    if family not in ARCHITECTURES:
        _refuse(source, "model_type", family, f"not a family megacore reads ({', '.join(ARCHITECTURES)})")
    for key in sorted(set(config) - _READ - _NO_EFFECT):
        _refuse(source, key, config[key])
    for key, value in (("hidden_act", "silu"), ("mlp_bias", False), ("pretraining_tp", 1)):
        if config.get(key, value) != value:
            _refuse(source, key, config[key])
    if config.get("attention_bias"):  # Llama/Mistral/Qwen3: bias on q, k, v and o
        _refuse(source, "attention_bias", True, "(a bias on the output projection too), which megacore does not "
                                                 "implement")
    if family in ("qwen2", "qwen3", "qwen3_moe") and config.get("use_sliding_window"):
        _refuse(source, "use_sliding_window", True, "sliding-window attention, which megacore does not implement")
    window, positions = config.get("sliding_window"), config.get("max_position_embeddings", base.max_seq_len)
    if family == "llama" and window is not None:
        _refuse(source, "sliding_window", window, "sliding-window attention, which Llama models do not have")
    if family in ("mistral", "mixtral") and window is not None and window < positions:
        _refuse(source, "sliding_window", window, f"below max_position_embeddings={positions}: sliding-window "
                                                  f"attention, which megacore does not implement")
    if any(t != "full_attention" for t in config.get("layer_types") or []):
        _refuse(source, "layer_types", config["layer_types"], "layers other than full attention")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    moe = _moe(config, family, source)
    return dataclasses.replace(
        base, family=family, dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads, vocab_size=config["vocab_size"],
        ffn_dim=config["intermediate_size"], head_dim=0 if head_dim * heads == config["hidden_size"] else head_dim,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), max_seq_len=positions,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), qkv_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "qwen3_moe"), **_rope(config, source), **moe)


def _moe(config: dict, family: str, source) -> dict:
    """The mixture-of-experts fields of ModelConfig (n_experts 0 for a dense family)."""
    if family not in MOE_FAMILIES:
        for key in ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if config.get(key):
                _refuse(source, key, config[key], f"experts in a {family} model, which transformers' class has not")
        return {"n_experts": 0}
    if config.get("router_jitter_noise"):
        _refuse(source, "router_jitter_noise", config["router_jitter_noise"], "noise on the router in training, "
                                                                             "which megacore does not implement")
    experts = config.get("num_experts") or config.get("num_local_experts")
    if not experts:
        _refuse(source, "num_experts", experts, "no experts in a mixture-of-experts family")
    width = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    if not config.get(width):
        _refuse(source, width, config.get(width), "no expert width")
    if family == "mixtral":
        return {"n_experts": experts, "n_active_experts": config.get("num_experts_per_tok", 2),
                "moe_ffn_dim": config[width], "moe_every": 1, "moe_dense_layers": [], "moe_norm_topk": True}
    return {"n_experts": experts, "n_active_experts": config.get("num_experts_per_tok", 8),
            "moe_ffn_dim": config[width], "moe_every": config.get("decoder_sparse_step", 1),
            "moe_dense_layers": sorted(config.get("mlp_only_layers") or []),
            "moe_norm_topk": bool(config.get("norm_topk_prob", False))}


def hf_config(cfg: ModelConfig) -> dict:
    """config.json of cfg's family."""
    if cfg.moe != (cfg.family in MOE_FAMILIES):
        raise ConfigError(f"model.family={cfg.family} with model.n_experts={cfg.n_experts}: "
                          + ("set model.family to qwen3_moe or mixtral to export a mixture of experts" if cfg.moe
                             else "that family is a mixture of experts"))
    if cfg.qkv_bias != (cfg.family == "qwen2") or cfg.qk_norm != (cfg.family in ("qwen3", "qwen3_moe")):
        raise ConfigError(f"model.family={cfg.family} with model.qkv_bias={cfg.qkv_bias} and model.qk_norm="
                          f"{cfg.qk_norm}: no transformers class of that family has this architecture")
    out = {
        "architectures": [ARCHITECTURES[cfg.family]], "model_type": cfg.family,
        "hidden_size": cfg.dim, "intermediate_size": ffn_hidden_dim(cfg), "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_size,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_dropout": cfg.dropout, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 3, "rope_scaling": None,
    }
    if cfg.rope_scaling == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    elif cfg.rope_scaling == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                               "low_freq_factor": cfg.rope_low_freq_factor,
                               "high_freq_factor": cfg.rope_high_freq_factor,
                               "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    if cfg.family in ("llama", "qwen3", "qwen3_moe"):
        out["attention_bias"] = False
    if cfg.family == "llama":
        out["mlp_bias"] = False
    if cfg.family in ("mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"):
        out["sliding_window"] = None
    if cfg.family in ("qwen2", "qwen3", "qwen3_moe"):
        out["use_sliding_window"] = False
    if cfg.family == "qwen3_moe":
        out.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.n_active_experts,
                   moe_intermediate_size=moe_hidden_dim(cfg), decoder_sparse_step=cfg.moe_every,
                   mlp_only_layers=sorted(cfg.moe_dense_layers), norm_topk_prob=cfg.moe_norm_topk)
    if cfg.family == "mixtral":
        out.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_active_experts,
                   intermediate_size=moe_hidden_dim(cfg), router_jitter_noise=0.0)
    if cfg.moe:
        out.update(router_aux_loss_coef=cfg.moe_aux_loss_coef, output_router_logits=False)
    return out


def check_overrides(derived: ModelConfig, loaded: ModelConfig, overrides: list[str], source) -> None:
    """A model.* override on the command line (its value is in `loaded`) that contradicts the directory's
    config.json is refused by name: the directory defines the model."""
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        field = key[len("model."):]
        if key.startswith("model.") and field in ARCHITECTURE_FIELDS and effective(loaded, field) != effective(derived,
                                                                                                               field):
            raise ConfigError(f"{override} contradicts train.init_from={source}, whose config.json gives "
                              f"{key}={getattr(derived, field)!r}; the directory defines the model: drop the override")
