"""Mixtures of experts: the router and grouped experts against transformers' Qwen3-MoE and Mixtral, published
models in and out exactly, the auxiliary loss against transformers' `load_balancing_loss_func`, expert
parallelism equal to one process (tests/moe_probe.py under torchrun), and MoE training runs that resume
bitwise, reshard across ep, and report each layer's expert load."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megacore.checkpoint.hf import hf_state, read_hf_config, save_hf_weights
from megacore.checkpoint.hf_config import model_config_from_hf
from megacore.checkpoint.streaming import ModelWeights
from megacore.checkpoint.weights import empty_model, load_trained
from megacore.config import Config, ConfigError, load_config
from megacore.errors import CheckpointError
from megacore.eval.generate import sample
from megacore.model import Llama, flops_per_token, num_params
from megacore.model.moe import Router, expert_swiglu, moe_layers
from megacore.parallel.estimate import estimate
from megacore.parallel.layout import Layout
from megacore.parallel.load_balance import after_step, auxiliary_loss, load_metrics, moe_layers_of
from megacore.preflight import check_combinations
from megacore.run_dir import load_run_config
from tests.helpers import REPO, failure_message, megacore, read_metrics, tiny_run_args, trained_weights

FAMILIES = {
    # (norm_topk_prob false: the weights are the raw probabilities of the chosen experts; a dense first layer)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=16, intermediate_size=48, mlp_only_layers=[0],
                       norm_topk_prob=False, head_dim=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, intermediate_size=16, head_dim=8)),
}


def _hf_model(family: str, **changes):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{
        "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 96, "num_experts_per_tok": 2, "max_position_embeddings": 128, **extra, **changes})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # (larger than the default init, so that routing and logits differ visibly)
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _ours(path) -> Llama:
    cfg = Config()
    cfg.model = model_config_from_hf(read_hf_config(path), cfg.model, path)
    model = empty_model(cfg)
    from megacore.checkpoint.hf import load_hf_into

    load_hf_into(model, path)
    return model.eval()


# The model against transformers ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_published_moe_gives_transformers_logits_and_generation_and_exports_back(family, tmp_path):
    theirs = _hf_model(family)
    theirs.save_pretrained(tmp_path / "in")
    ours = _ours(tmp_path / "in")
    assert ours.cfg.moe and [i for i in range(3) if ours.cfg.is_moe_layer(i)] == ([1, 2] if family == "qwen3_moe"
                                                                                  else [0, 1, 2])
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (ours(ids) - expected).abs().max() < 1e-5
        generated = theirs.generate(ids[:1, :6], max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    assert sample(ours, ids[0, :6].tolist(), 16, temperature=0) == generated
    # Export: per-expert tensors, the family's config, read back by transformers with the same logits.
    out = tmp_path / "out"
    out.mkdir()
    save_hf_weights(ModelWeights(ours), ours.cfg, out, max_shard_bytes=20_000)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["num_experts_per_tok"] == 2
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    module = {"qwen3_moe": "mlp.experts.3.down_proj", "mixtral": "block_sparse_moe.experts.3.w2"}[family]
    assert f"model.layers.2.{module}.weight" in names
    back = type(theirs).from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, expected) or (back(ids).logits - expected).abs().max() < 1e-6
    # Streamed (a layer's stacked experts read once per file): each file is what safetensors writes for its tensors.
    whole = hf_state(ours)
    for file in set(names.values()):
        save_file({n: whole[n].contiguous() for n, f in names.items() if f == file}, tmp_path / "ref.safetensors",
                  metadata={"format": "pt"})
        assert (out / file).read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), file


def test_export_is_refused_when_the_balancing_bias_would_route_differently_in_transformers(tmp_path):
    _hf_model("mixtral").save_pretrained(tmp_path / "in")
    ours = _ours(tmp_path / "in")
    ours.layers["1"].feed_forward.router.expert_bias[2] = 0.01
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.router\.expert_bias is not zero"):
        save_hf_weights(ModelWeights(ours), ours.cfg, tmp_path / "out")


@pytest.mark.parametrize("family, norm", [("qwen3_moe", False), ("qwen3_moe", True), ("mixtral", True)])
def test_the_router_chooses_and_weights_as_transformers_does(family, norm):
    changes = {"norm_topk_prob": norm} if family == "qwen3_moe" else {}
    theirs = _hf_model(family, **changes).model.layers[1].mlp.gate
    cfg = Config().model
    cfg.dim, cfg.n_experts, cfg.n_active_experts, cfg.moe_norm_topk = 32, 4, 2, norm
    ours = Router(cfg)
    with torch.no_grad():
        ours.gate.weight.copy_(theirs.weight)
        ours.expert_bias.zero_()
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(2))
    _, weights, experts = theirs(x)
    route = ours(x)
    assert torch.equal(route.experts, experts)
    assert (route.weights - weights).abs().max() < 1e-6
    assert torch.allclose(route.weights.sum(-1), torch.ones(50)) == norm


def test_grouped_experts_equal_a_loop_over_experts_forward_and_backward_with_an_idle_expert():
    g = torch.Generator().manual_seed(0)
    w1, w3 = (torch.randn(4, 24, 16, generator=g, requires_grad=True) for _ in range(2))
    w2 = torch.randn(4, 16, 24, generator=g, requires_grad=True)
    x = torch.randn(10, 16, generator=g, requires_grad=True)
    counts = torch.tensor([4, 0, 6, 0])  # experts 1 and 3 receive no tokens
    weight = torch.randn(10, 16, generator=g)
    results = []
    for grouped in (True, False):
        out = expert_swiglu(x, counts, w1, w2, w3, grouped=grouped)
        results.append([out, *torch.autograd.grad((out * weight).sum(), [x, w1, w2, w3])])
    for a, b in zip(*results):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert results[0][2][1].abs().max() == 0 and results[0][2][3].abs().max() == 0  # (idle experts: no gradient)
    # No tokens at all (an expert-parallel rank nobody routed to): zeros, and zero gradients that still exist.
    out = expert_swiglu(x[:0], torch.zeros(4, dtype=torch.long), w1, w2, w3)
    assert out.shape == (0, 16)
    assert all(g is not None and g.abs().max() == 0 for g in torch.autograd.grad(out.sum(), [w1, w2, w3]))


def test_the_auxiliary_loss_is_transformers_load_balancing_loss_for_the_same_logits():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    cfg = load_config(REPO / "configs/tiny.yaml", ["model.family=qwen3_moe", "model.qk_norm=true",
                                                   "model.n_experts=8", "model.n_active_experts=2",
                                                   "model.vocab_size=64", "model.dim=32", "model.n_heads=4",
                                                   "model.moe_dense_layers=[0]", "model.moe_ffn_dim=16"]).model
    model = Llama(cfg).train()
    logits = []
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda module, args, out: logits.append(out.probs.log()))
    model(torch.randint(0, 64, (3, 20)))
    share, total = auxiliary_loss(moe_layers_of([model]), None)
    expected = load_balancing_loss_func(tuple(logits), 8, 2)
    assert len(logits) == 3 and abs(total.item() - expected.item()) < 1e-6 * expected.item()
    assert abs(share.item() - expected.item()) < 1e-6 * expected.item()  # (one rank: its share is the loss)


def test_the_balancing_bias_moves_towards_the_mean_load_and_not_on_a_skipped_step():
    cfg = load_config(REPO / "configs/tiny.yaml", ["model.family=mixtral", "model.n_experts=4", "model.vocab_size=64",
                                                   "model.dim=32",
                                                   "model.n_heads=4", "model.n_layers=2"]).model
    model = Llama(cfg).train()
    routers = [m.router for _, m in moe_layers(model)]
    for router, load in zip(routers, ([10.0, 30.0, 20.0, 20.0], [5.0, 5.0, 5.0, 25.0])):
        router.tokens_per_expert.copy_(torch.tensor(load))
    layers = moe_layers_of([model])
    metrics = load_metrics([i for i, _ in layers], after_step(layers, None, 0.01, skip=torch.tensor(1.0)))
    assert all(r.expert_bias.abs().max() == 0 for r in routers)  # a skipped step moves nothing
    assert metrics["moe/layer0/load_max"].item() == pytest.approx(1.5)
    assert metrics["moe/layer1/load_min"].item() == pytest.approx(0.5)
    assert 0 < metrics["moe/layer1/load_entropy"].item() < metrics["moe/layer0/load_entropy"].item() < 1
    routers[0].tokens_per_expert.copy_(torch.tensor([10.0, 30.0, 20.0, 20.0]))
    after_step(layers, None, 0.01)
    assert routers[0].expert_bias.tolist() == pytest.approx([0.01, -0.01, 0.0, 0.0])
    assert routers[0].tokens_per_expert.abs().max() == 0  # (counts start again each step)


def test_flops_and_the_active_parameter_count_take_k_experts_per_moe_layer():
    dense = ["model.dim=64", "model.n_heads=4", "model.n_layers=3", "model.vocab_size=100", "model.ffn_dim=96"]
    moe = [*dense, "model.family=qwen3_moe", "model.qk_norm=true", "model.n_experts=8", "model.n_active_experts=2",
           "model.moe_ffn_dim=48",
           "model.moe_dense_layers=[0]"]
    d, m = (load_config(REPO / "configs/tiny.yaml", o) for o in (dense, moe))
    # Two of 8 experts of width 48 are as many multiply-adds as one dense FFN of width 96, plus the router.
    assert flops_per_token(m.model, 64) - flops_per_token(d.model, 64) == 3 * 2 * 2 * (64 * 8)
    model = Llama(m.model)
    experts = 2 * 8 * 3 * 64 * 48
    assert num_params(model) - num_params(model, active=True) == experts * 6 // 8


@pytest.mark.parametrize("world, overrides, named", [
    (2, ["parallel.ep=2", "model.n_experts=0", "model.family=llama"], "model.n_experts > 0"),
    (4, ["parallel.ep=3", "model.n_experts=6"], "parallel.ep=3 must divide parallel.dp_shard=4"),
    (4, ["parallel.ep=2", "model.n_experts=3"], "model.n_experts=3"),
    (4, ["parallel.ep=2", "parallel.tp=2"], "cp and tp must be 1"),
])
def test_bad_expert_parallel_layouts_are_refused_naming_the_values(world, overrides, named):
    cfg = load_config(REPO / "configs/tiny.yaml", ["model.family=mixtral", "model.n_experts=4", *overrides])
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
        Layout.resolve(cfg, world)


@pytest.mark.parametrize("overrides, named", [
    (["model.family=llama", "model.n_experts=4"], "model.n_experts=4 with model.family=llama"),
    (["model.family=mixtral", "model.n_experts=0"], "model.family=mixtral is a mixture of experts"),
    (["model.family=mixtral", "model.n_experts=4", "model.moe_every=5"], "no layer is an MoE layer"),
    (["model.family=mixtral", "model.n_experts=4", "model.moe_dense_layers=[1]"], r"model.moe_dense_layers=\[1\]"),
    (["model.family=mixtral", "model.n_experts=4", "model.n_active_experts=5"], "model.n_active_experts=5"),
])
def test_a_bad_moe_model_section_is_refused_naming_the_keys(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_config(REPO / "configs/tiny.yaml", overrides)


@pytest.mark.parametrize("overrides, named", [
    (["parallel.tp=2"], "tensor parallelism of experts"),
    (["parallel.pp=2", "model.moe_aux_loss_coef=0.01"], "model.moe_bias_update_rate"),
    (["parallel.backend=deepspeed"], "parallel.backend=deepspeed"),
])
def test_what_moe_does_not_have_yet_is_refused_before_launch(overrides, named):
    cfg = load_config(REPO / "configs/tiny.yaml", ["model.family=mixtral", "model.n_experts=4", *overrides])
    with pytest.raises(ConfigError, match=named):
        check_combinations(cfg)


@pytest.mark.parametrize("family, change, named", [
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("qwen3_moe", {"shared_expert_intermediate_size": 32}, "shared_expert_intermediate_size"),
])
def test_a_published_moe_field_we_do_not_implement_is_refused_by_name(family, change, named, tmp_path):
    _hf_model(family).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=named):
        load_trained(tmp_path)


# Expert parallelism against one process (tests/moe_probe.py) --------------------------------------------

AUX, BIAS = "model.moe_aux_loss_coef=0.01", "model.moe_bias_update_rate=0.001"
PROBES = {  # name: (processes, case, overrides)
    "ep2": (2, "step", ["parallel.ep=2", "train.micro_batch_size=2", AUX, BIAS]),
    "ep2_idle_rank": (2, "starved", ["parallel.ep=2", "train.micro_batch_size=2", AUX]),
    # two micro-batches per step: the auxiliary loss is the mean of each global micro-batch's
    "ep2_two_micro_batches": (2, "step", ["parallel.ep=2", "train.micro_batch_size=1", AUX]),
    "ep2_full_ac": (2, "step", ["parallel.ep=2", "train.micro_batch_size=2", AUX,
                                "parallel.activation_checkpointing=full"]),
    "ep2_dp_shard4": (4, "step", ["parallel.ep=2", "parallel.dp_shard=4", "train.micro_batch_size=1", AUX]),
    # FSDP on the experts' rows (dim 1): an ep rank's experts are fewer than the ranks that shard them
    "fsdp4_experts_dim1": (4, "step", ["parallel.dp_shard=4", "model.n_experts=3", "train.micro_batch_size=1", AUX]),
    "ep2_dp_shard4_experts_dim1": (4, "step", ["parallel.ep=2", "parallel.dp_shard=4", "model.n_experts=2",
                                               "model.n_active_experts=1", "train.micro_batch_size=1", AUX]),
    "hsdp2_ep2": (4, "step", ["parallel.ep=2", "parallel.dp_replicate=2", "train.micro_batch_size=1", AUX]),
    "pp2_ep2": (4, "step", ["parallel.ep=2", "parallel.pp=2", "train.micro_batch_size=1", BIAS]),
}


@pytest.mark.processes
@pytest.mark.parametrize("name", list(PROBES))
def test_one_training_step_under_expert_parallelism_equals_one_process(name, tmp_path):
    nproc, case, overrides = PROBES[name]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "tests/moe_probe.py", str(tmp_path), case, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure_message(proc)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    seen = set()
    for rank, report in enumerate(reports):
        assert report["loss"] < 1e-5, (name, rank)
        if AUX in overrides:
            assert report["aux"] < 1e-5, (name, rank)
        for param, diff in report["grads"].items():
            assert diff < 1e-5, (name, rank, param)
        seen |= set(report["grads"])
        assert all(diff == 0 for diff in report["bias"].values()), (name, rank)
        if BIAS in overrides:
            assert report["bias_moved"] > 0
        # Each ep rank holds its share of the experts (then FSDP splits that share further).
        held = [shape for param, shape in report["local_experts"].items() if param.endswith("experts.w1")]
        if "parallel.ep=2" in overrides:
            experts = 2 if "model.n_experts=2" in overrides else 4
            assert held and max(shape[0] for shape in held) <= experts // 2, (name, rank)
        if name.endswith("experts_dim1"):  # every rank holds a slice of each of its experts' rows
            assert all(shape[1] < 32 for shape in held), (name, rank)
        if case == "starved":  # experts 2 and 3 (the second ep rank's) received no token anywhere
            assert all(layer[2] == layer[3] == 0 for layer in report["tokens_per_expert"]), rank
    assert len(seen) == 38, "every parameter of the 3-layer model is compared on some rank"


# Training runs -----------------------------------------------------------------------------------------------

MOE = ["model.n_layers=3", "model.family=qwen3_moe", "model.qk_norm=true", "model.n_experts=4",
       "model.n_active_experts=2", "model.moe_ffn_dim=64",
       "model.moe_dense_layers=[0]", "model.moe_aux_loss_coef=0.01", "model.moe_bias_update_rate=0.001",
       "train.steps=6", "checkpoint.every=3", "train.eval_every=6", "train.global_batch_size=4",
       "train.micro_batch_size=2", "optim.grad_clip=0.05"]


@pytest.fixture(scope="module")
def moe_single(short_documents, tmp_path_factory):
    run = tmp_path_factory.mktemp("moe") / "single"
    megacore("train", *tiny_run_args(short_documents, run, *MOE, "train.micro_batch_size=4",
                                     "logging.wandb_mode=offline"))
    return run


def test_an_moe_run_logs_each_layers_expert_load_and_resumes_bitwise(moe_single, short_documents, tmp_path):
    train = read_metrics(moe_single)
    for step in (1, 6):
        row = train[step]
        assert row["moe/aux_loss"] > 0
        for layer in (1, 2):  # (layer 0 is dense)
            assert 0 <= row[f"moe/layer{layer}/load_min"] <= 1 <= row[f"moe/layer{layer}/load_max"]
            assert 0 < row[f"moe/layer{layer}/load_entropy"] <= 1
        assert "moe/layer0/load_max" not in row
    # The same figures in W&B (read back from its offline files).
    from tests.wandb_offline import offline_runs

    (history,) = [run["history"] for run in offline_runs(moe_single)]
    rows = {row["_step"]: row for row in history}
    assert rows[6]["train/moe/layer2/load_entropy"] == train[6]["moe/layer2/load_entropy"]
    assert rows[6]["train/moe/aux_loss"] == train[6]["moe/aux_loss"]
    run = tmp_path / "run"
    megacore("train", *tiny_run_args(short_documents, run, *MOE, "train.micro_batch_size=4", "train.stop_after=3"))
    megacore("train", *tiny_run_args(short_documents, run, *MOE, "train.micro_batch_size=4"), "--resume", "auto")
    resumed = read_metrics(run)
    for step in range(4, 7):  # the bias and everything else came back exactly
        assert resumed[step]["loss"] == train[step]["loss"] and resumed[step]["grad_norm"] == train[step]["grad_norm"]


@pytest.mark.processes
@pytest.mark.parametrize("nproc, layout", [(2, ["parallel.ep=2"]),
                                           (4, ["parallel.ep=2", "parallel.dp_shard=4", "train.micro_batch_size=1"])],
                         ids=["ep2", "ep2_dp_shard4"])
def test_an_ep2_run_trains_like_one_process_and_resumes_on_ep1(nproc, layout, moe_single, short_documents, tmp_path):
    """ep2 x dp_shard4: the experts are FSDP-sharded over 2 ranks as well (efsdp 2) before the checkpoint."""
    single = read_metrics(moe_single)
    run = tmp_path / "run"
    proc = megacore("train", *tiny_run_args(short_documents, run, *MOE, *layout, "train.stop_after=3"),
                    "--nproc", str(nproc), timeout=600)
    assert "(ep 2)" in proc.stdout and "M active" in proc.stdout
    # Each rank's real shards (experts split over ep) are the estimator's.
    measured = json.loads((run / "memory.json").read_text())["ranks"]
    for real, est in zip(measured, estimate(load_run_config(run), nproc)["ranks"], strict=True):
        for key in ("parameters", "gradients", "optimizer"):
            assert real[key] == est[key], (real["rank"], key)
    # The balancing bias moved, and its checkpoint holds one process's values (written from 2 ranks).
    step3 = "checkpoints/step_00000003"
    ours, reference = trained_weights(run / step3), trained_weights(moe_single / step3)
    bias = "layers.1.feed_forward.router.expert_bias"
    assert ours[bias].abs().max() > 0 and torch.equal(ours[bias], reference[bias])
    megacore("train", *tiny_run_args(short_documents, run, *MOE, "train.micro_batch_size=4"), "--resume", "auto")
    train = read_metrics(run)
    for step in range(1, 7):  # 1-3 with ep2, 4-6 resumed on one process from its checkpoint
        for key in ("loss", "moe/aux_loss", "moe/layer2/load_max"):
            assert train[step][key] == pytest.approx(single[step][key], rel=1e-5), (step, key)
        assert train[step]["grad_norm"] == pytest.approx(single[step]["grad_norm"], rel=1e-4), step


@pytest.mark.processes
def test_init_from_a_published_moe_reads_each_ranks_experts_under_ep2(short_documents, tmp_path):
    """Each rank reads only its experts' tensors (safetensors slices of a sharded directory); with a learning
    rate too small to move any weight, the checkpoint after one step is the published model."""
    from safetensors.torch import load_file

    from data_pipeline.tokenizer import load_tokenizer
    from megacore.checkpoint.hf import hf_state
    from megacore.checkpoint.weights import load_trained

    vocab = load_tokenizer(short_documents).vocab_size
    published = tmp_path / "published"
    _hf_model("qwen3_moe", hidden_size=64, num_hidden_layers=2, vocab_size=vocab, head_dim=16,
              max_position_embeddings=64).save_pretrained(published, max_shard_size="100KB")
    assert len(list(published.glob("*.safetensors"))) > 1
    run = tmp_path / "run"
    megacore("train", *tiny_run_args(short_documents, run, f"train.init_from={published}", "parallel.ep=2",
                                     "train.steps=1", "checkpoint.every=1", "optim.lr=1e-30", "optim.warmup_steps=0",
                                     "train.eval_every=1000"), "--nproc", "2", timeout=600)
    expected = {k: v for f in published.glob("*.safetensors") for k, v in load_file(f).items()}
    got = hf_state(load_trained(run).model)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.processes
def test_what_moe_blocks_keep_for_the_backward_is_the_estimators_figure(tmp_path):
    """Measured with a saved-tensor hook at the end of the forward (tests/cp_probe.py's memory case) at 1024
    tokens: an MoE model's blocks keep k copies of each token through its experts (the estimator's formula)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           "tests/cp_probe.py", str(tmp_path), "memory", "model.document_masking=false",
                           "train.device=cpu", "data.seq_len=1024", "model.max_seq_len=1024", "model.dim=128",
                           "train.global_batch_size=1", "train.micro_batch_size=1", "model.n_experts=8",
                           "model.n_active_experts=2", "model.moe_ffn_dim=128", "model.family=mixtral"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure_message(proc)
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["measured"] == pytest.approx(report["estimated"], rel=0.05)
