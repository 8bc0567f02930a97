"""The attention kernel of a block: causal SDPA, and document masking without a T x T mask.

Plain causal attention is `scaled_dot_product_attention(is_causal=True)`: flash (or cuDNN) on CUDA,
the blocked flash kernel on CPU; neither materialises scores.

Document masking (packed windows, attention confined to each document) is described once per forward
by a `DocumentMask` built from the loader's position ids (a position 0 starts a document) and shared
by every layer. A dense (batch, 1, T, T) mask would take SDPA off its fused kernels (with grouped-query
attention down to the math kernel: T x T scores per head), so instead:
- CUDA: FlexAttention with a block mask (compiled, as FlexAttention is only fast compiled); blocks
  that no query of a document can see are skipped, none are stored as T x T.
- CPU (FlexAttention has no CPU backward): one causal SDPA call per document of each row, on views of
  q, k and v. Exact, and memory linear in T; the number of calls grows with the documents per window.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


class DocumentMask:
    """Which document each position belongs to: (batch, seq) ids, from position ids. What the device's
    kernel needs is built here, once per forward and outside any compiled block: the block mask on
    CUDA; on CPU the document spans are read when first needed."""

    def __init__(self, position_ids: torch.Tensor):
        self.position_ids = position_ids
        # Every position 0 opens a document; a window starting mid-document keeps its prefix as document 0.
        self.doc_ids = (position_ids == 0).cumsum(-1)
        self._spans: list[list[tuple[int, int]]] | None = None
        self._block_mask = None
        # Under context parallelism: the window's documents in global positions, built by the first layer's
        # kernel and shared by the others (megacore/parallel/context_parallel.py).
        self.context_parallel_layout = None
        if use_flex(position_ids.device):
            self.block_mask()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.position_ids.shape)

    def spans(self) -> list[list[tuple[int, int]]]:
        """[(start, end)] of each document, per row (read to the host once per forward; CPU path only)."""
        if self._spans is None:
            b, t = self.shape
            starts = (self.position_ids == 0).clone()
            starts[:, 0] = True
            rows, cols = starts.nonzero(as_tuple=True)
            per_row: list[list[int]] = [[] for _ in range(b)]
            for r, c in zip(rows.tolist(), cols.tolist()):  # one entry per document in the batch
                per_row[r].append(c)
            self._spans = [list(zip(s, s[1:] + [t])) for s in per_row]
        return self._spans

    def block_mask(self):
        """FlexAttention's BlockMask for causal attention within documents (built once, for every layer)."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.doc_ids

            def mask_mod(b, h, q, kv):
                return (q >= kv) & (doc[b, q] == doc[b, kv])

            b, t = self.shape
            self._block_mask = _compiled(create_block_mask)(mask_mod, b, None, t, t, device=doc.device)
        return self._block_mask


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


def use_flex(device: torch.device) -> bool:
    return device.type == "cuda"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask | torch.Tensor | None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """q (batch, heads, seq, head_dim), k/v (batch, kv_heads, seq_k, head_dim) -> (batch, heads, seq, head_dim).

    mask: None (causal), a DocumentMask, or an explicit boolean mask (decoding with a KV cache)."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    if use_flex(q.device):
        from torch.nn.attention.flex_attention import flex_attention

        if dropout_p > 0:  # (refused before training starts: megacore/device.py)
            raise ValueError("FlexAttention has no attention dropout: model.dropout with model.document_masking")
        return _compiled(flex_attention)(q, k, v, block_mask=mask.block_mask(), enable_gqa=gqa)
    return per_document_attention(q, k, v, mask.spans(), gqa, dropout_p)


@torch.compiler.disable  # the loop depends on each batch's documents: compiling it would recompile per batch
def per_document_attention(q, k, v, spans: list[list[tuple[int, int]]], gqa: bool, dropout_p: float = 0.0):
    rows = []
    for row, docs in enumerate(spans):
        qr, kr, vr = q[row:row + 1], k[row:row + 1], v[row:row + 1]
        outs = [F.scaled_dot_product_attention(qr[:, :, s:e], kr[:, :, s:e], vr[:, :, s:e], is_causal=True,
                                               dropout_p=dropout_p, enable_gqa=gqa) for s, e in docs]
        rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def attention_kernels() -> set:
    """The aten attention kernels that SDPA and FlexAttention dispatch to: the ops selective activation
    checkpointing keeps (megacore/parallel/activation_checkpoint.py)."""
    ops = set()
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(torch.ops.aten, name):
            ops.add(getattr(torch.ops.aten, name).default)
    hop = getattr(torch.ops.higher_order, "flex_attention", None)
    if hop is not None:
        ops.add(hop)
    return ops
