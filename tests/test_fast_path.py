"""The GPU fast path, checked on CPU: document masking without a T x T mask, the chunked loss, and a
train step that never waits on the device between forward and optimizer step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megacore.config import ModelConfig
from megacore.loss import IGNORE_INDEX, LanguageModelLoss, linear_cross_entropy, linear_cross_entropy_sums, loss_sum
from megacore.model import Llama
from megacore.model import attention as attention_module
from megacore.monitor.host_syncs import HostSyncCounter
from megacore.monitor.memory import peak_allocated_during

FUSED = LanguageModelLoss()  # the default: hidden states into the LossHead's chunked loss


def with_loss_head(model: Llama) -> Llama:
    FUSED.prepare(model)
    return model


def fused_loss(model, tokens, positions, labels):
    """The training loss as the train module computes it (megacore/loss.py)."""
    return FUSED(model.output, model(tokens, positions, return_hidden=True), labels)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128,
                          "max_seq_len": 256, **kw})


def dense_document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The (batch, 1, T, T) mask that document masking used before: causal, within each document."""
    doc = (position_ids == 0).cumsum(-1)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def packed_positions(lengths_per_row: list[list[int]], t: int) -> torch.Tensor:
    """Position ids of rows packed with documents of the given lengths (the first may be a continuation)."""
    rows = []
    for lengths in lengths_per_row:
        pos = torch.cat([torch.arange(n) for n in lengths])
        assert pos.numel() == t
        rows.append(pos)
    return torch.stack(rows)


class DenseDocumentAttention:
    """Routes `model`'s DocumentMask through the old dense-mask SDPA call (each block's attention kernel):
    the reference."""

    def __init__(self, model):
        self.attentions = [block.attention for block in model.layers.values()]

    def __enter__(self):
        def dense(q, k, v, mask, dropout_p=0.0):
            if isinstance(mask, attention_module.DocumentMask):
                mask = dense_document_mask(mask.position_ids)
            return attention_module.attention(q, k, v, mask, dropout_p)
        for attention in self.attentions:
            attention.kernel = dense
        return self

    def __exit__(self, *exc):
        for attention in self.attentions:
            attention.kernel = attention_module.attention


def forward_backward(model, tokens, positions, labels):
    model.zero_grad()
    loss = fused_loss(model, tokens, positions, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_document_masking_equals_the_dense_mask_forward_and_backward():
    torch.manual_seed(0)
    model = with_loss_head(Llama(tiny(document_masking=True)))
    t = 96
    positions = packed_positions([[10, 30, 56], [96], [40, 1, 55]], t)  # a mid-document start, a 1-token document
    positions[0, :10] += 7  # the row opens inside a document
    tokens = torch.randint(0, 128, (3, t))
    labels = torch.randint(0, 128, (3, t))
    logits = model(tokens, positions)
    loss, grads = forward_backward(model, tokens, positions, labels)
    with DenseDocumentAttention(model):
        ref_logits = model(tokens, positions)
        ref_loss, ref_grads = forward_backward(model, tokens, positions, labels)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_matches_the_dense_mask():
    """The CUDA kernel's mask (FlexAttention has no CPU backward, so only the forward is checked here)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    t = 256
    positions = packed_positions([[100, 156], [256]], t)
    mask = attention_module.DocumentMask(positions)
    doc = mask.doc_ids
    block = create_block_mask(lambda b, h, q, kv: (q >= kv) & (doc[b, q] == doc[b, kv]), 2, None, t, t, device="cpu")
    q, k, v = torch.randn(2, 4, t, 16), torch.randn(2, 2, t, 16), torch.randn(2, 2, t, 16)
    out = flex_attention(q, k, v, block_mask=block, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_document_mask(positions), enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class LargestTensors(TorchDispatchMode):
    """Records every op whose output has at least `limit` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.found = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor) and o.numel() >= self.limit:
                self.found.append((str(func), tuple(o.shape)))
        return out


def test_masked_forward_and_backward_at_4096_hold_no_t_by_t_tensor():
    t = 4096
    cfg = tiny(document_masking=True, max_seq_len=t, dim=32, n_heads=2, n_kv_heads=1, n_layers=1)
    model = with_loss_head(Llama(cfg))
    positions = packed_positions([[1000, 3096]], t)
    tokens, labels = torch.randint(0, 128, (1, t)), torch.randint(0, 128, (1, t))
    with LargestTensors(t * t) as rec:
        fused_loss(model, tokens, positions, labels).backward()
    assert rec.found == [], rec.found[:5]
    with DenseDocumentAttention(model), LargestTensors(t * t) as dense:  # the check sees the old mask
        fused_loss(model, tokens, positions, labels)
    assert dense.found


@pytest.mark.parametrize("ignored", [0.0, 0.3])
def test_chunked_loss_equals_full_logits_cross_entropy(ignored, monkeypatch):
    import megacore.loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 128 * 37)  # 37 rows per chunk: an uneven last chunk
    torch.manual_seed(0)
    model = with_loss_head(Llama(tiny()))
    tokens = torch.randint(0, 128, (3, 50))
    labels = torch.randint(0, 128, (3, 50))
    labels[torch.rand(3, 50) < ignored] = IGNORE_INDEX
    loss, grads = forward_backward(model, tokens, None, labels)
    model.zero_grad()
    ref = loss_sum(model(tokens), labels)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad():
        sums = FUSED.sums(model.output, model(tokens, return_hidden=True), labels)
        logits = model(tokens)
    torch.testing.assert_close(sums.loss, ref.detach(), atol=1e-6, rtol=1e-6)
    assert int(sums.correct) == int(((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum())


def test_chunked_loss_without_gradients_matches_with():
    torch.manual_seed(0)
    h, w = torch.randn(300, 16), torch.randn(1000, 16)
    labels = torch.randint(0, 1000, (300,))
    plain = linear_cross_entropy_sums(h, w, labels)
    w.requires_grad_(True)
    fused = linear_cross_entropy(h, w, labels)
    torch.testing.assert_close(plain.loss, fused.detach())
    assert int(plain.correct) == int(((h @ w.detach().t()).argmax(-1) == labels).sum())


class CountSyncs:
    """A trainer hook: host syncs inside each train step (batch read to optimizer step), and between
    steps (logging, evaluation)."""

    def __init__(self):
        self.inside, self.between, self._counter = {}, {}, None

    def _start(self):
        self._counter = HostSyncCounter()
        self._counter.__enter__()

    def _stop(self) -> list[str]:
        if self._counter is None:
            return []
        self._counter.__exit__(None, None, None)
        where, self._counter = self._counter.where, None
        return where

    def before_step(self, trainer, step):
        self.between[step - 1] = self._stop()
        self._start()

    def after_step(self, trainer, step, result):
        self.inside[step] = self._stop()
        self._start()

    def after_eval(self, trainer, step, results):
        pass

    def after_save(self, trainer, step, path):
        pass


def test_train_step_makes_no_host_sync_and_logging_steps_read_their_metrics(data_dir, tmp_path):
    from megacore.config import load_config
    from megacore.train.trainer import train
    from tests.helpers import REPO, TINY

    cfg = load_config(REPO / "configs/tiny.yaml", [
        *TINY, f"data.dir={data_dir}", f"train.run_dir={tmp_path / 'run'}", "train.steps=6", "logging.log_every=3",
        "train.eval_every=100", "checkpoint.every=100"])
    hook = CountSyncs()
    try:
        train(cfg, "none", hooks=(hook,))
    finally:
        hook._stop()
    # (The memory report gathers every rank's figures after the first and the last step: not counted.)
    assert {step: hook.inside[step] for step in range(2, 6)} == {step: [] for step in range(2, 6)}
    assert hook.between[3], "a logging step reads its loss and gradient norm"
    assert hook.between[1] == [] and hook.between[4] == []


def test_chunked_loss_lowers_the_peak_memory_of_a_training_step():
    torch.manual_seed(0)
    model = with_loss_head(Llama(tiny(vocab_size=32768, max_seq_len=1024, n_layers=1)))
    tokens, labels = torch.randint(0, 32768, (1, 1024)), torch.randint(0, 32768, (1, 1024))

    def full_logits_step():
        model.zero_grad(set_to_none=True)
        loss_sum(model(tokens), labels).backward()

    def chunked_step():
        model.zero_grad(set_to_none=True)
        fused_loss(model, tokens, None, labels).backward()

    full_logits_step(), chunked_step()  # gradients allocated once, as in training
    cpu = torch.device("cpu")
    before, after = peak_allocated_during(full_logits_step, cpu), peak_allocated_during(chunked_step, cpu)
    assert after <= 0.7 * before, (before, after)  # measured here: 390 MiB -> 70 MiB


def test_gpu_benchmark_smoke_runs_every_variant_on_this_machine():
    """bench/gpu.py --smoke: tiny shapes on CPU, so the GPU script cannot rot while no GPU is lent."""
    import subprocess
    import sys

    from tests.helpers import REPO, failure_message

    proc = subprocess.run([sys.executable, "bench/gpu.py", "--smoke"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, failure_message(proc)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [row.split("|")[1].strip() for row in rows]
    assert len(rows) == 7 and names[0] == "eager", proc.stdout
    measured = [row for row in rows if "skipped" not in row]
    assert len(measured) >= 6 and all("cpu flash" in row for row in measured), proc.stdout
    assert "float8" in rows[-1] and ("skipped" in rows[-1]) == (not torch.cuda.is_available())


def test_device_defaults_and_the_peak_mfu_is_measured_against(monkeypatch):
    from megacore.config import ConfigError, load_config
    from megacore.device import check_float8, peak_from_name, peak_tflops, resolve_auto
    from tests.helpers import REPO

    assert peak_from_name("NVIDIA H100 80GB HBM3", bf16=True) == 989.0
    assert peak_from_name("NVIDIA H100 PCIe", bf16=True) == 756.0
    assert peak_from_name("NVIDIA H200", bf16=False) == 494.5
    assert peak_from_name("NVIDIA A100-SXM4-80GB", bf16=True) == 312.0
    assert peak_from_name("Some Future GPU", bf16=True) is None

    cfg = load_config(REPO / "configs/tiny.yaml", [])
    assert (cfg.train.mixed_precision, cfg.parallel.compile) == ("auto", "auto")
    resolve_auto(cfg, torch.device("cpu"))
    assert (cfg.train.mixed_precision, cfg.parallel.compile) == ("fp32", False), "CPUs: fp32, eager"
    assert peak_tflops(load_config(REPO / "configs/tiny.yaml", ["train.peak_tflops=123"]),
                       torch.device("cpu")) == (123.0, "train.peak_tflops")
    cfg.train.float8 = True  # (set by hand: loading it needs torchao)
    with pytest.raises(ConfigError, match="train.float8=true needs a CUDA GPU with compute capability >= 8.9"):
        check_float8(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="parallel.tp=1"):
        load_config(REPO / "configs/tiny.yaml", ["train.float8=true", "parallel.tp=2"])
