"""Weight initialisation that does not depend on how the weights are split.

Every parameter's initial values are a function of (seed, parameter name, position) only: the
flattened parameter is cut into fixed blocks of BLOCK elements and block b is drawn from its own
generator, seeded with a hash of (seed, name, b). A rank that holds any slice of a parameter (an FSDP
row range, a tensor-parallel column range, a pipeline stage's layers) draws only the blocks its slice
touches, so the weights after init, gathered, are `torch.equal` on one process and on any layout, and no
rank ever materialises more than one block beyond its own slice.

Why generators keyed by name and slice rather than a seed checkpoint loaded through DCP (torchtitan's
way): no extra step, file or job before the first run, and the same code initialises a model of any
size on a laptop. The cost: values are drawn once per block on the parameter's device, so the same seed
gives the same weights on every layout of one device type (CPU and CUDA generators differ).

What grows with what: work per rank grows with the elements it holds (plus at most one block per row
range), memory with one chunk of rows (CHUNK_ELEMENTS).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

BLOCK = 1 << 20  # elements per generator
CHUNK_ELEMENTS = 1 << 24  # rows drawn at a time when filling a column slice


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{name}\0{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def normal_values(seed: int, name: str, numel: int, start: int, stop: int, std: float,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements [start, stop) of the flattened N(0, std^2) initialisation of parameter `name` (numel elements)."""
    out = torch.empty(stop - start, device=device, dtype=torch.float32)
    if stop <= start:
        return out
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        base = block * BLOCK
        # The block's length depends only on the parameter's size: the same values whoever draws it.
        values = torch.empty(min(BLOCK, numel - base), device=device, dtype=torch.float32)
        generator = torch.Generator(device=device)
        generator.manual_seed(_block_seed(seed, name, block))
        values.normal_(0.0, std, generator=generator)
        lo, hi = max(start, base), min(stop, base + values.numel())
        out[lo - start:hi - start] = values[lo - base:hi - base]
    return out


@torch.no_grad()
def init_slice(local: torch.Tensor, name: str, global_shape: Sequence[int], offset: Sequence[int],
               std: float | None, seed: int) -> None:
    """Fill `local`, the slice of parameter `name` at `offset` in a tensor of `global_shape`, with its
    initial values: N(0, std^2) drawn as above, ones when std is None (norm weights), zeros when it
    is 0 (biases)."""
    if std is None or std == 0:
        local.fill_(1.0 if std is None else 0.0)
        return
    if local.numel() == 0:
        return
    numel = 1
    for n in global_shape:
        numel *= n
    if len(global_shape) == 1:
        local.copy_(normal_values(seed, name, numel, offset[0], offset[0] + local.shape[0], std, local.device))
        return
    if len(global_shape) == 3:
        # Stacked matrices (MoE experts, e x rows x cols) are the matrix of all their rows, e * rows x cols.
        experts, rows, cols = global_shape
        flat = (experts * rows, cols)
        if offset[1] == 0 and local.shape[1] == rows:  # whole experts (split by expert): one row range
            init_slice(local.view(-1, local.shape[-1]), name, flat, (offset[0] * rows, offset[2]), std, seed)
            return
        for i in range(local.shape[0]):  # a range of each expert's rows (FSDP on dim 1)
            init_slice(local[i], name, flat, ((offset[0] + i) * rows + offset[1], offset[2]), std, seed)
        return
    if len(global_shape) > 3:
        raise ValueError(f"{name}: initialisation of {len(global_shape)}-d parameters is not implemented")
    rows, cols = global_shape
    (r0, c0), (n_rows, n_cols) = offset, local.shape
    chunk = max(1, CHUNK_ELEMENTS // cols)
    for ra in range(r0, r0 + n_rows, chunk):
        rb = min(r0 + n_rows, ra + chunk)
        values = normal_values(seed, name, numel, ra * cols, rb * cols, std, local.device).view(rb - ra, cols)
        local[ra - r0:rb - r0].copy_(values[:, c0:c0 + n_cols])
