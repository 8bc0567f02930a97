"""Context parallelism: the sequence of every sample split over the `cp` ranks of the device mesh, with
document masking kept exact (Llama 3's all-gather scheme, not ring attention).

Sharding. The sequence (length T) is cut into 2*cp chunks of c = T / (2*cp) tokens; cp rank r holds
chunks r and 2*cp-1-r (head-tail load balancing: under a causal mask the early chunks attend to little
and the late ones to much, so every rank gets one of each and the same work). Input ids, labels and
position ids are sharded alike (`shard_sequence`); position ids are the real ones (per document with
document masking, 0..T-1 otherwise), so each rank applies RoPE at the right angles.

Attention. Queries stay local; keys and values (after RoPE) are all-gathered over the cp group with
autograd (the backward reduce-scatters their gradients, `gather_sequence`) and put back in sequence
order. Each local query chunk then attends to the keys it may see, in global positions:
- CPU: one SDPA call per document piece. A query chunk [s, e) meets document [ds, de) in queries
  [max(s, ds), min(e, de)) whose keys are [ds, min(e, de)): causal aligned to the lower right (the last
  query sees the last key). No log-sum-exp merging is needed: every query's keys are in one call.
- CUDA: FlexAttention with a block mask over (local queries, all keys), its mask_mod translating local
  query indices to global positions; built once per forward and shared by every layer.

What grows with what: per layer, the gathered K/V hold T tokens of kv heads (what all-gather CP costs;
with GQA it is small next to the local activations, T / cp tokens of everything else), kept for the
backward unless parallel.cp_regather_kv (then gathered again in the backward, attention recomputed); the CPU path's
lower-right masks hold (queries x keys) booleans per document piece (at most c x T per chunk), the CUDA
block mask (T / cp / 128) x (T / 128) blocks. The number of SDPA calls on CPU grows with the documents
per window. Parameters are sharded by FSDP over dp_shard x cp (megacore/parallel/parallelize.py).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megacore.errors import ConfigError
from megacore.model.attention import DocumentMask, use_flex


def chunk_ids(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two chunks (of 2*cp) that cp rank `cp_rank` holds: head and tail."""
    return cp_rank, 2 * cp - 1 - cp_rank


def shard_sequence(x: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This cp rank's share of `x` along `dim` (the sequence): chunks r and 2*cp-1-r, concatenated."""
    chunks = x.chunk(2 * cp, dim=dim)
    head, tail = chunk_ids(cp, cp_rank)
    return torch.cat([chunks[head], chunks[tail]], dim=dim)


def sequence_order(seq_len: int, cp: int, device=None) -> torch.Tensor:
    """The global position of every entry of the cp ranks' shards laid end to end (rank-major, as an
    all-gather lays them): a permutation of 0..seq_len-1."""
    c = seq_len // (2 * cp)
    starts = [chunk * c for r in range(cp) for chunk in chunk_ids(cp, r)]
    return torch.cat([torch.arange(s, s + c, device=device) for s in starts])


@functools.lru_cache(maxsize=8)
def _restore_order(seq_len: int, cp: int, device: torch.device) -> torch.Tensor:
    """Index that puts rank-major shards back in sequence order (computed once per length: every layer of
    every step uses it)."""
    return torch.argsort(sequence_order(seq_len, cp, device))


def unshard_sequence(shards: torch.Tensor, cp: int, dim: int = 1) -> torch.Tensor:
    """The inverse of shard_sequence for shards gathered rank-major along `dim`: sequence order."""
    return shards.index_select(dim, _restore_order(shards.shape[dim], cp, shards.device))


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 2 of (batch, heads, seq, head_dim) over `group`; backward: reduce-scatter (the sum
    of every rank's gradient of this rank's keys and values)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, size: int):
        ctx.group, ctx.size = group, size
        x = x.contiguous()
        out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_single(out, x, group=group)
        # Rank-major along the sequence. (flatten copies once and unshard_sequence's index_select again: two
        # transient copies of a layer's gathered keys or values, next to the one the attention keeps.)
        return out.unflatten(0, (size, -1)).permute(1, 2, 0, 3, 4).flatten(2, 3)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        b, h, t, d = grad.shape
        stacked = grad.reshape(b, h, ctx.size, t // ctx.size, d).permute(2, 0, 1, 3, 4).flatten(0, 1).contiguous()
        out = torch.empty((b, h, t // ctx.size, d), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_single(out, stacked, group=ctx.group)
        return out, None, None


def gather_sequence(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """Every cp rank's shard of x (batch, heads, seq/cp, head_dim), in sequence order; gradients flow back
    to each rank's own shard."""
    return unshard_sequence(_GatherSequence.apply(x, group, cp), cp, dim=2)


class ContextParallelAttention:
    """The attention kernel of every block under context parallelism (set as `Attention.kernel` by
    `apply_context_parallel`): local queries against the keys and values of the whole sequence."""

    def __init__(self, group, cp: int, cp_rank: int, regather_kv: bool = False):
        self.group, self.cp, self.cp_rank, self.regather_kv = group, cp, cp_rank, regather_kv
        self._causal: dict[tuple, _GlobalLayout] = {}  # without documents: one layout per (length, device)

    @torch.compiler.disable  # collectives and a per-batch loop over documents
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float = 0.0):
        if isinstance(mask, torch.Tensor):
            raise ConfigError("generation (a KV cache) cannot run under parallel.cp > 1: generate in one process")
        if self.regather_kv and torch.is_grad_enabled():
            # Keep only this rank's keys and values for the backward, which gathers them again and recomputes
            # the attention (random state restored: dropout draws the same masks). Every rank recomputes in
            # the same order, so the collectives match.
            return checkpoint(self._attend, q, k, v, mask, dropout_p, use_reentrant=False)
        return self._attend(q, k, v, mask, dropout_p)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float) -> torch.Tensor:
        local = q.shape[2]
        k, v = gather_sequence(k, self.group, self.cp), gather_sequence(v, self.group, self.cp)
        layout = self._layout(mask, local * self.cp, q.device)
        if use_flex(q.device):
            from torch.nn.attention.flex_attention import flex_attention

            from megacore.model.attention import _compiled

            return _compiled(flex_attention)(q, k, v, block_mask=layout.block_mask(), enable_gqa=q.shape[1] != k.shape[1])
        return _attend_pieces(q, k, v, layout.pieces(q.shape[0]), q.shape[1] != k.shape[1], dropout_p)

    def _layout(self, mask: DocumentMask | None, seq_len: int, device) -> _GlobalLayout:
        """The window's documents in global positions, built by the first layer and kept on the mask (one per
        forward, shared by every layer); without document masking, one document (plain causal)."""
        if mask is None:
            key = (seq_len, device)
            if key not in self._causal:
                self._causal[key] = _GlobalLayout(self, None, seq_len, device)
            return self._causal[key]
        cached = mask.context_parallel_layout
        if cached is None:
            positions = mask.position_ids.contiguous()
            gathered = torch.empty((self.cp * positions.shape[0], positions.shape[1]), dtype=positions.dtype,
                                   device=positions.device)
            dist.all_gather_single(gathered, positions, group=self.group)
            global_positions = unshard_sequence(gathered.unflatten(0, (self.cp, -1)).permute(1, 0, 2).flatten(1),
                                                self.cp, dim=1)
            cached = _GlobalLayout(self, global_positions, seq_len, device)
            mask.context_parallel_layout = cached
        return cached


class _GlobalLayout:
    """One window's attention pattern for this cp rank: which keys each local query chunk sees."""

    def __init__(self, kernel: ContextParallelAttention, global_positions: torch.Tensor | None, seq_len: int,
                 device):
        self.cp, self.cp_rank, self.seq_len, self.device = kernel.cp, kernel.cp_rank, seq_len, device
        self.global_positions = global_positions
        self._pieces = None
        self._block_mask = None

    def chunks(self) -> list[tuple[int, int]]:
        """Global [start, end) of this rank's two query chunks, in the order the shard holds them."""
        c = self.seq_len // (2 * self.cp)
        return [(i * c, (i + 1) * c) for i in chunk_ids(self.cp, self.cp_rank)]

    def pieces(self, batch: int) -> list[list[tuple[int, int, int]]]:
        """Per batch row, the (query start, query end, key start) of every document piece in global positions,
        in the order of the local queries (CPU path; read to the host once per forward)."""
        if self.global_positions is None:  # one document per row: the chunks themselves
            return [[(s, e, 0) for s, e in self.chunks()]] * batch
        if self._pieces is None:
            self._pieces = [self._row_pieces(row) for row in self._document_starts()]
        return self._pieces

    def _document_starts(self) -> list[list[int]]:
        starts = (self.global_positions == 0).clone()
        starts[:, 0] = True  # a window that starts mid-document: its prefix is a document
        rows, cols = starts.nonzero(as_tuple=True)
        per_row: list[list[int]] = [[] for _ in range(starts.shape[0])]
        for r, c in zip(rows.tolist(), cols.tolist()):  # one entry per document in the batch
            per_row[r].append(c)
        return per_row

    def _row_pieces(self, starts: list[int]) -> list[tuple[int, int, int]]:
        ends = starts[1:] + [self.seq_len]
        pieces = []
        for s, e in self.chunks():
            for ds, de in zip(starts, ends):  # (documents are few next to tokens; a scan is enough)
                if ds < e and de > s:
                    pieces.append((max(s, ds), min(e, de), ds))
        return pieces

    def block_mask(self):
        """FlexAttention's BlockMask: local query i at global position q_pos[i] sees key j when j <= q_pos[i]
        and (document masking) both are in one document."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            from megacore.model.attention import _compiled

            q_pos = torch.cat([torch.arange(s, e, device=self.device) for s, e in self.chunks()])
            if self.global_positions is None:
                def mask_mod(b, h, q, kv):
                    return q_pos[q] >= kv
                batch = None
            else:
                doc = (self.global_positions == 0).cumsum(-1)

                def mask_mod(b, h, q, kv):
                    return (q_pos[q] >= kv) & (doc[b, q_pos[q]] == doc[b, kv])
                batch = doc.shape[0]
            self._block_mask = _compiled(create_block_mask)(mask_mod, batch, None, len(q_pos), self.seq_len,
                                                            device=self.device)
        return self._block_mask


def _attend_pieces(q, k, v, pieces: list[list[tuple[int, int, int]]], gqa: bool, dropout_p: float) -> torch.Tensor:
    """CPU: one SDPA call per document piece; q holds the local queries (their global positions are the
    pieces' in order), k and v the whole sequence in order."""
    rows = []
    for row, row_pieces in enumerate(pieces):
        qr, kr, vr = q[row:row + 1], k[row:row + 1], v[row:row + 1]
        outs, local = [], 0
        for qs, qe, ks in row_pieces:
            m, n = qe - qs, qe - ks
            qp = qr[:, :, local:local + m]
            if m == n:  # the piece starts its document: causal from the top left is the same
                out = F.scaled_dot_product_attention(qp, kr[:, :, ks:qe], vr[:, :, ks:qe], is_causal=True,
                                                     dropout_p=dropout_p, enable_gqa=gqa)
            else:  # lower-right causal: query i sees keys up to n - m + i
                allowed = torch.ones(m, n, dtype=torch.bool, device=q.device).tril(n - m)
                out = F.scaled_dot_product_attention(qp, kr[:, :, ks:qe], vr[:, :, ks:qe], attn_mask=allowed,
                                                     dropout_p=dropout_p, enable_gqa=gqa)
            outs.append(out)
            local += m
        rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def apply_context_parallel(model, cp_mesh, regather_kv: bool = False) -> None:
    """Every block of `model` (a Llama or a pipeline stage of one) attends through ContextParallelAttention
    over `cp_mesh` (a 1-D mesh: this rank's cp group); regather_kv: parallel.cp_regather_kv."""
    kernel = ContextParallelAttention(cp_mesh.get_group(), cp_mesh.size(), cp_mesh.get_local_rank(), regather_kv)
    for block in model.layers.values():
        block.attention.kernel = kernel
