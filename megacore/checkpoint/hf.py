"""Hugging Face format: export a checkpoint as a directory of its family (Llama, Mistral, Qwen2, Qwen3,
Qwen3-MoE, Mixtral), and read one back.

The directory holds model.safetensors, config.json (megacore/checkpoint/hf_config.py), and the
tokenizer: ours as tokenizer.model with tokenizer_config.json and special_tokens_map.json, a published
model's as its files came (tokenizer.json, tokenizer_config.json, chat_template.jinja). Our RoPE already uses the
rotate-half layout of `transformers`, so weights map by name with no permutation. Loading reads
safetensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from data_pipeline.storage import exists, is_url, listing, location, remove_file, upload, upload_tree
from data_pipeline.tokenizer import HFTokenizer, Tokenizer, copy_tokenizer
from megacore.checkpoint.hf_config import ARCHITECTURE_FIELDS, effective, hf_config, model_config_from_hf
from megacore.checkpoint.safetensors_stream import TensorSpec, write_safetensors
from megacore.checkpoint.streaming import ModelWeights, Weights
from megacore.config import ConfigError, ModelConfig
from megacore.errors import CheckpointError
from megacore.model.llama import Llama

_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


# Mixture-of-experts layers: (module name, expert weight names for our w1, w2, w3). The router is
# `{module}.gate.weight`; experts are separate tensors per expert on disk (transformers fuses them in memory
# only), stacked along dim 0 in ours.
_MOE = {"qwen3_moe": ("mlp", {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}),
        "mixtral": ("block_sparse_moe", {"w1": "w1", "w2": "w2", "w3": "w3"})}
# Ours and not the format's: the auxiliary-loss-free balancing bias (zero, or export is refused).
_NOT_EXPORTED = re.compile(r"layers\.\d+\.feed_forward\.router\.expert_bias")


def to_hf_name(name: str, family: str = "llama") -> str:
    """The Hugging Face name of one of our tensors (for stacked experts: hf_expert_names)."""
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m.group(2) == "feed_forward.router.gate.weight" and family in _MOE:
        return f"model.layers.{m.group(1)}.{_MOE[family][0]}.gate.weight"
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"


def hf_expert_names(name: str, family: str, n_experts: int) -> list[str] | None:
    """The per-expert Hugging Face tensors of our stacked expert weight `name` (None: not an expert weight)."""
    m = re.fullmatch(r"layers\.(\d+)\.feed_forward\.experts\.(w[123])", name)
    if m is None:
        return None
    module, names = _MOE[family]
    return [f"model.layers.{m.group(1)}.{module}.experts.{e}.{names[m.group(2)]}.weight" for e in range(n_experts)]


def from_hf_name(name: str, family: str = "llama") -> tuple[str, int | None] | None:
    """(our name, expert index or None) of a Hugging Face tensor; None: not one of the family's."""
    for ours, theirs in _TOP.items():
        if name == theirs:
            return ours, None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        return None
    layer, rest = m.groups()
    if family in _MOE:
        module, names = _MOE[family]
        if rest == f"{module}.gate.weight":
            return f"layers.{layer}.feed_forward.router.gate.weight", None
        e = re.fullmatch(rf"{module}\.experts\.(\d+)\.(\w+)\.weight", rest)
        if e and e.group(2) in names.values():
            ours = next(k for k, v in names.items() if v == e.group(2))
            return f"layers.{layer}.feed_forward.experts.{ours}", int(e.group(1))
    for ours, theirs in _LAYER.items():
        if rest == theirs:
            return f"layers.{layer}.{ours}", None
    return None


def export_entries(cfg: ModelConfig) -> list[tuple[str, str, int | None, tuple[int, ...]]]:
    """(Hugging Face name, our name, expert index or None, shape) of every tensor of the format, in our
    state dict's order with stacked experts split; from the model built on the meta device (no memory).
    lm_head.weight is listed even when tied (the export leaves it out)."""
    with torch.device("meta"):
        state = Llama(cfg).state_dict()
    out = []
    for name, tensor in state.items():
        if _NOT_EXPORTED.fullmatch(name):
            continue
        experts = hf_expert_names(name, cfg.family, cfg.n_experts) if cfg.moe else None
        if experts is None:
            out.append((to_hf_name(name, cfg.family), name, None, tuple(tensor.shape)))
        else:
            out.extend((theirs, name, e, tuple(tensor.shape[1:])) for e, theirs in enumerate(experts))
    return out


def _refuse_moved_bias(weights: Weights, cfg: ModelConfig) -> None:
    """The auxiliary-loss-free balancing bias must be zero: the format has none."""
    with torch.device("meta"):
        names = [name for name in Llama(cfg).state_dict() if _NOT_EXPORTED.fullmatch(name)]
    for name in names:
        if weights.read(name).abs().max() > 0:
            raise CheckpointError(f"{name} is not zero (auxiliary-loss-free balancing moved it): the "
                                  f"{cfg.family} format has no such bias, so the export would route tokens "
                                  f"differently; export is refused")


def hf_state(model: Llama) -> dict[str, torch.Tensor]:
    """The model's tensors under their Hugging Face names, stacked experts split (views, no copies)."""
    weights = ModelWeights(model)
    _refuse_moved_bias(weights, model.cfg)
    return {theirs: weights.read(ours) if e is None else weights.read(ours)[e]
            for theirs, ours, e, _ in export_entries(model.cfg)}


# Export shards: transformers' default size, so that a 70B model is ~30 files, not one of 280 GB.
MAX_SHARD_BYTES = 5 * 10**9


def save_hf_weights(weights: Weights, cfg: ModelConfig, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                    written=None, dtype: torch.dtype = torch.float32) -> None:
    """config.json of the model's family and its weights as safetensors in `dtype`: one model.safetensors,
    or model-0000i-of-0000n.safetensors with model.safetensors.index.json beyond max_shard_bytes.

    Streamed: the files are planned from names and shapes, and each tensor is read from `weights` as it
    is written (a layer's stacked experts are kept until its last expert is written), so memory is a
    tensor or a layer's experts, not the model. `written(path)` is called as each weights file is
    complete (an upload, while the next is written)."""
    written = written or (lambda path: None)
    _refuse_moved_bias(weights, cfg)
    entries = [e for e in export_entries(cfg) if not (cfg.tie_embeddings and e[0] == "lm_head.weight")]
    shards, size = [[]], 0
    for entry in entries:
        nbytes = TensorSpec(entry[0], dtype, entry[3]).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in tqdm(list(zip(names, shards)), desc="export", unit="file", leave=False,
                            disable=len(shards) == 1):
        write_safetensors(out / name, [TensorSpec(theirs, dtype, shape) for theirs, _, _, shape in shard],
                          _shard_reader(weights, shard, dtype), metadata={"format": "pt"})
        written(out / name)
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(TensorSpec(e[0], dtype, e[3]).nbytes for e in entries)},
             "weight_map": {theirs: name for name, shard in zip(names, shards) for theirs, *_ in shard}}, indent=2))
    config = hf_config(cfg)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _shard_reader(weights: Weights, shard: list, dtype: torch.dtype):
    """`read(hf_name)` for one file's tensors: a stacked expert weight is read once and kept until the
    file's last expert of it is written (safetensors orders a file's tensors by name, so one layer's
    experts of w1, w2 and w3 interleave)."""
    source = {theirs: (ours, e) for theirs, ours, e, _ in shard}
    left = Counter(ours for _, ours, e, _ in shard if e is not None)
    stacked: dict[str, torch.Tensor] = {}

    def read(theirs: str) -> torch.Tensor:
        ours, e = source[theirs]
        if e is None:
            return weights.read(ours).to(dtype)
        if ours not in stacked:
            stacked[ours] = weights.read(ours)
        tensor = stacked[ours][e].to(dtype)
        left[ours] -= 1
        if not left[ours]:
            del stacked[ours]
        return tensor

    return read


def export_hf(weights: Weights, cfg: ModelConfig, tokenizer: Tokenizer, out: str | Path,
              max_shard_bytes: int = MAX_SHARD_BYTES, dtype: torch.dtype = torch.float32):
    """A Hugging Face directory at `out`, streamed from `weights` (megacore/checkpoint/streaming.py). In
    object storage: written in local staging, each safetensors shard uploaded (and deleted here) as soon
    as it is complete, so local disk holds one shard; config.json goes up last, and a prefix without it is
    no model to transformers or to train.init_from."""
    if is_url(out):
        import tempfile

        dest = location(out)
        # An older export there is no longer whole (its config.json goes first), and none of its weight
        # files or index may mix with the new ones.
        remove_file(dest / "config.json")
        for old in listing(dest):
            if old.name.endswith(".safetensors") or old.name == "model.safetensors.index.json":
                remove_file(old)
        with tempfile.TemporaryDirectory(prefix="megacore-export-") as staging:
            def upload_now(path: Path) -> None:
                upload(path, dest / path.name)
                path.unlink()

            _write_hf(weights, cfg, tokenizer, Path(staging), max_shard_bytes, dtype, upload_now)
            upload_tree(Path(staging), dest, last=("config.json",))
        return dest
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_hf(weights, cfg, tokenizer, out, max_shard_bytes, dtype)
    return out


def _write_hf(weights: Weights, cfg: ModelConfig, tokenizer: Tokenizer, out: Path, max_shard_bytes: int,
              dtype: torch.dtype, written=None) -> None:
    save_hf_weights(weights, cfg, out, max_shard_bytes, written, dtype)
    if isinstance(tokenizer, HFTokenizer) or tokenizer.chat_templates:
        # A published model's tokenizer (tokenizer.json, or tokenizer.model with a chat template): its own
        # files, as they came in (the chat template in chat_template.jinja or in tokenizer_config.json).
        copy_tokenizer(tokenizer, out)
        return
    shutil.copyfile(tokenizer.path, out / "tokenizer.model")
    sp = tokenizer.sp
    special = {"bos_token": sp.id_to_piece(tokenizer.bos_id), "eos_token": sp.id_to_piece(tokenizer.eos_id),
               "unk_token": sp.id_to_piece(sp.unk_id()), "pad_token": sp.id_to_piece(tokenizer.pad_id)}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        # Our sentencepiece model adds the dummy "▁" prefix; add_prefix_space makes transformers'
        # tokenizer encode and decode exactly as we do.
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": False,
        "add_prefix_space": True, "model_max_length": cfg.max_seq_len, **special}, indent=2))


def read_hf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, our-named state dict) of a Hugging Face Llama directory."""
    path = Path(path)
    config = read_hf_config(path)
    family = config.get("model_type", "llama")
    files = sorted(set(_hf_tensor_files(path).values()))
    state, experts = {}, {}
    for f in files:
        for name, tensor in load_file(str(f)).items():
            ours = from_hf_name(name, family)
            if ours is None:
                raise CheckpointError(f"{f}: unexpected tensor {name!r} for a {family} model")
            if ours[1] is None:
                state[ours[0]] = tensor
            else:
                experts.setdefault(ours[0], {})[ours[1]] = tensor
    for name, by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise CheckpointError(f"{path}: experts of {name} are not numbered 0..n-1: {sorted(by_index)}")
        state[name] = torch.stack([by_index[e] for e in range(len(by_index))])
    if config.get("tie_word_embeddings") and "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    return config, state


class PublishedWeights:
    """A Hugging Face directory on local disk describing the model `cfg`: each read is the whole-tensor box
    of `hf_slice_reader` (one tensor, or one layer's experts stacked)."""

    def __init__(self, path: Path, cfg: ModelConfig):
        with torch.device("meta"):
            self.shapes = {name: tuple(t.shape) for name, t in Llama(cfg).state_dict().items()}
        self.slice = hf_slice_reader(path)

    def read(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if _NOT_EXPORTED.fullmatch(name):  # (ours only: a published model has no balancing bias)
            return torch.zeros(shape)
        return self.slice(name, shape, (0,) * len(shape), shape)


def check_hf_config(config: dict, cfg: ModelConfig, source: str | Path, local: Path | None = None) -> None:
    """Refuse a Hugging Face model that `cfg` would not reproduce: a field we do not implement (named,
    never dropped; megacore/checkpoint/hf_config.py), an architecture field that differs from cfg's
    (both values named), or a weight whose shape is not the model's (safetensors headers only; from `local`,
    the downloaded copy, when `source` is in object storage)."""
    derived = model_config_from_hf(config, cfg, source)
    for field in ARCHITECTURE_FIELDS:
        if effective(derived, field) != effective(cfg, field):
            raise ConfigError(f"train.init_from={source}: config.json gives model.{field}={effective(derived, field)!r}, "
                              f"this run's model has {effective(cfg, field)!r}")
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Llama(cfg).named_parameters()}
    files, handles = _hf_tensor_files(Path(local or source)), {}
    for name, shape in shapes.items():
        experts = hf_expert_names(name, cfg.family, cfg.n_experts) if cfg.moe else None
        for theirs, want in ([(to_hf_name(name, cfg.family), shape)] if experts is None
                             else [(e, shape[1:]) for e in experts]):
            if theirs not in files:
                raise ConfigError(f"train.init_from={source}: no tensor {theirs} (for {name})")
            if files[theirs] not in handles:
                handles[files[theirs]] = safe_open(str(files[theirs]), framework="pt")
            found = tuple(handles[files[theirs]].get_slice(theirs).get_shape())
            if found != want:
                raise ConfigError(f"train.init_from={source}: {files[theirs].name} has {theirs} of shape {found}, the "
                                  f"model its config.json describes needs {want}")


def read_hf_config(path: str | Path) -> dict:
    config_path = location(path) / "config.json"
    if not exists(config_path):
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

    load_slices(parts, hf_slice_reader(path))


def hf_slice_reader(path: str | Path):
    """`read(our name, global shape, offset, local shape)`: that box of a weight of the Hugging Face
    directory `path`, read as a safetensors slice, in fp32 (stacked experts: each expert's own tensor)."""
    path = Path(path)
    config, files = read_hf_config(path), _hf_tensor_files(path)
    family = config.get("model_type", "llama")
    n_experts = config.get("num_experts") or config.get("num_local_experts") or 0
    for name in files:
        if from_hf_name(name, family) is None:
            raise CheckpointError(f"{files[name]}: unexpected tensor {name!r} for a {family} model")
    handles: dict[Path, object] = {}

    def read_one(theirs: str, name: str, shape: tuple, offset: tuple, local: tuple) -> torch.Tensor:
        if theirs not in files:
            raise CheckpointError(f"{path}: missing weight {theirs} (for {name})")
        f = files[theirs]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        piece = handles[f].get_slice(theirs)
        if tuple(piece.get_shape()) != tuple(shape):
            raise CheckpointError(f"{f}: {theirs} has shape {tuple(piece.get_shape())}, the model needs {tuple(shape)}")
        return piece[tuple(slice(o, o + n) for o, n in zip(offset, local))].to(torch.float32)

    def read(name: str, shape: tuple, offset: tuple, local: tuple) -> torch.Tensor:
        experts = hf_expert_names(name, family, n_experts) if family in _MOE else None
        if experts is not None:  # this rank's experts (a range of dim 0), each from its own tensor
            if local[0] == 0:
                return torch.empty(local)
            return torch.stack([read_one(experts[e], name, shape[1:], offset[1:], local[1:])
                                for e in range(offset[0], offset[0] + local[0])])
        theirs = to_hf_name(name, family)
        if theirs not in files and name == "output.weight" and config.get("tie_word_embeddings"):
            theirs = to_hf_name("tok_embeddings.weight")
        return read_one(theirs, name, shape, offset, local)

    return read


def load_hf_into(model: Llama, path: str | Path) -> None:
    """Initialise `model` from a Hugging Face directory whose config.json describes this model."""
    config, state = read_hf(path)
    check_hf_config(config, model.cfg, path)
    own = {k: v for k, v in model.state_dict().items() if _NOT_EXPORTED.fullmatch(k)}  # (the balancing bias: 0)
    missing = set(model.state_dict()) - set(state) - set(own)
    if missing:
        raise CheckpointError(f"{path}: missing weights {sorted(missing)[:5]}")
    with torch.no_grad():
        model.load_state_dict({**own, **{k: v.to(torch.float32) for k, v in state.items()}}, strict=True)
