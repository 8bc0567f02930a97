"""Activation checkpointing (parallel.activation_checkpointing) changes memory, not training: with dropout
the recomputed forward draws the same masks, so gradients and the random stream are those without it."""

import torch

from megacore.config import ModelConfig
from megacore.loss import loss_sum
from megacore.model import Llama
from megacore.parallel.activation_checkpoint import apply_activation_checkpointing


def test_dropout_gradients_are_the_same_with_any_activation_checkpointing():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32, dropout=0.1)
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    grads, streams = {}, {}
    for mode in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = Llama(cfg).train()
        apply_activation_checkpointing(model, mode)
        torch.manual_seed(42)
        loss_sum(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        grads[mode] = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}
        streams[mode] = torch.get_rng_state()
    for mode in ("full", "selective"):
        for name, grad in grads["none"].items():
            assert torch.allclose(grads[mode][name], grad, atol=1e-6), (mode, name)
        assert torch.equal(streams[mode], streams["none"]), "the random stream advances as without checkpointing"
