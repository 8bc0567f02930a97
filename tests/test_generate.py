"""Generation: the KV cache gives the tokens (and logits) of recomputing the whole context, also when
the context window slides; stop tokens end a reply."""

import torch

from megacore.config import ModelConfig
from megacore.eval.generate import sample
from megacore.model import Llama
from megacore.model.llama import KVCache


def _model(max_seq_len=32):
    torch.manual_seed(0)
    return Llama(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                             max_seq_len=max_seq_len)).eval()


def test_cached_logits_equal_full_recompute():
    model = _model()
    tokens = torch.randint(0, 300, (2, 20))
    full = model(tokens)
    cache = KVCache(model, 2, 32)
    pieces = [model(tokens[:, :7], cache=cache)]  # a prefill, then one token at a time, then a chunk
    pieces += [model(tokens[:, i:i + 1], cache=cache) for i in range(7, 15)]
    pieces.append(model(tokens[:, 15:], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_with_cache_equals_without():
    model = _model(max_seq_len=32)
    prompt = torch.randint(0, 300, (10,)).tolist()
    # 60 new tokens: the 32-token context fills and the window slides (the cache is rebuilt).
    with_cache = sample(model, prompt, 60, temperature=0, use_cache=True)
    without = sample(model, prompt, 60, temperature=0, use_cache=False)
    assert with_cache == without and len(with_cache) == 60


def test_sampling_with_cache_equals_without_for_the_same_seed():
    model = _model()
    prompt = [1, 2, 3]
    a = sample(model, prompt, 25, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = sample(model, prompt, 25, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3),
               use_cache=False)
    assert a == b


def test_generation_ends_at_a_stop_token():
    model = _model()
    free = sample(model, [5, 6], 30, temperature=0)
    stop = free[4]
    stopped = sample(model, [5, 6], 30, temperature=0, stop_ids={stop})
    assert stopped == free[:free.index(stop) + 1]
