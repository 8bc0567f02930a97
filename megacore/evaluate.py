"""Evaluation: loss, perplexity and bits per byte on a prepared split."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from data_pipeline.loader import PackedLoader
from megacore.distributed import all_reduce_sum
from megacore.loss import IGNORE_INDEX, loss_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader: PackedLoader, max_batches: int, device: torch.device,
             amp: contextlib.AbstractContextManager | None = None, micro_batch_size: int = 8) -> dict[str, float]:
    """Mean loss over the first `max_batches` global batches of `loader` (in order), summed over ranks.

    The batches are the same for any number of ranks, so the result does not depend on the layout.
    Bits per byte divides by the split's UTF-8 bytes per token, so it compares across tokenizers.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for _ in range(min(max_batches, loader.batches_per_epoch)):
        batch = loader.next_batch()
        for inputs, labels in zip(batch["input_ids"].split(micro_batch_size), batch["labels"].split(micro_batch_size)):
            labels = labels.to(device)
            with amp or contextlib.nullcontext():
                logits = model(inputs.to(device))
            total += float(loss_sum(logits, labels))
            count += int((labels != IGNORE_INDEX).sum())
    total, count = all_reduce_sum([total, count], device)
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": loss / math.log(2) / loader.store.bytes_per_token, "tokens": int(count)}
