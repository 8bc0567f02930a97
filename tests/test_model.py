"""The Llama model: shapes, causality, grouped-query attention, init, and the FLOPs formula."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megacore.config import ModelConfig
from megacore.model import Llama, flops_per_token, num_params


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 100,
                          "max_seq_len": 64, **kw})


def test_forward_shape_and_finite():
    model = Llama(tiny())
    logits = model(torch.randint(0, 100, (3, 16)))
    assert logits.shape == (3, 16, 100) and torch.isfinite(logits).all()


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Llama(tiny())
    x = torch.randint(0, 100, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 100
    assert torch.allclose(model(x)[0, :12], model(y)[0, :12], atol=1e-6)
    assert not torch.allclose(model(x)[0, 12:], model(y)[0, 12:])


def test_grouped_query_attention_uses_fewer_kv_weights():
    mha, gqa = Llama(tiny(n_kv_heads=4)), Llama(tiny(n_kv_heads=1))
    assert gqa.layers["0"].attention.wk.weight.shape == (16, 64)
    assert num_params(gqa) < num_params(mha)


def test_same_seed_same_weights_and_position_ids_default():
    torch.manual_seed(1)
    a = Llama(tiny())
    torch.manual_seed(1)
    b = Llama(tiny())
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    x = torch.randint(0, 100, (2, 10))
    assert torch.equal(a(x), a(x, position_ids=torch.arange(10).expand(2, 10)))


@pytest.mark.parametrize("cfg", [tiny(), tiny(dim=128, n_heads=8, n_kv_heads=8, n_layers=3, vocab_size=512)])
def test_flops_per_token_matches_flop_counter(cfg):
    seq = 64
    model = Llama(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq))
    # The math backend expresses attention as matmuls that the counter sees (the fused CPU kernel is not counted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens).float().sum().backward()
    measured = counter.get_total_flops() / tokens.numel()
    assert flops_per_token(cfg, seq) == pytest.approx(measured, rel=0.05)


def test_document_masking_makes_packed_documents_independent():
    torch.manual_seed(0)
    model = Llama(tiny(document_masking=True))
    eos = 2
    first, second = torch.randint(3, 100, (1, 7)), torch.randint(3, 100, (1, 9))
    packed = torch.cat([first, torch.tensor([[eos]]), second], dim=1)
    from data_pipeline.loader import document_position_ids
    positions = torch.from_numpy(document_position_ids(packed.numpy(), eos))
    assert positions[0, 8].item() == 0  # the second document starts after EOS
    alone = model(second, torch.arange(9)[None])
    assert torch.allclose(model(packed, positions)[:, 8:], alone, atol=1e-5)
    # Without masking the second document sees the first.
    plain = Llama(tiny())
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(packed, positions)[:, 8:], alone, atol=1e-5)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    plain = Llama(tiny())
    dropped = Llama(tiny(dropout=0.2))
    dropped.load_state_dict(plain.state_dict())
    x = torch.randint(0, 100, (2, 16))
    dropped.train()
    assert not torch.equal(dropped(x), dropped(x)), "a fresh mask per forward"
    plain.eval(), dropped.eval()
    assert torch.equal(dropped(x), plain(x)), "evaluation and generation never drop"
