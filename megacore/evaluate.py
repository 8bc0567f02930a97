"""Evaluation: loss, perplexity, bits per byte and next-token accuracy on a prepared split."""

from __future__ import annotations

import contextlib
import math

import torch

from data_pipeline.loader import PackedLoader
from megacore.distributed import all_reduce_sum
from megacore.loss import IGNORE_INDEX


@torch.no_grad()
def evaluate(pm, loader: PackedLoader, max_batches: int, n_micro: int, device: torch.device,
             amp: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """Mean loss over the first `max_batches` global batches of `loader` (in order), summed over ranks.

    `pm` is a ParallelModel (any layout). The batches are the same for any number of ranks, so the
    result does not depend on the layout. Bits per byte divides by the split's UTF-8 bytes per token,
    so it compares across tokenizers.
    """
    pm.train(False)
    total, correct, count = 0.0, 0.0, 0
    for _ in range(min(max_batches, loader.batches_per_epoch)):
        batch = loader.next_batch()
        loss, right = pm.eval_loss(batch, n_micro, device, amp or contextlib.nullcontext())
        if pm.reports_loss:
            total, correct = total + loss, correct + right
        count += int((batch["labels"] != IGNORE_INDEX).sum()) if pm.counts_tokens else 0
    total, correct, count = all_reduce_sum([total, correct, count], device)
    pm.train(True)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": loss / math.log(2) / loader.store.bytes_per_token, "accuracy": correct / count,
            "tokens": int(count)}
