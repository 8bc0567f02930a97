"""The language-modelling loss shared by training and evaluation."""

import torch
import torch.nn.functional as F

# Labels equal to IGNORE_INDEX carry no loss (prompt tokens in fine-tuning); the loader sets them.
from data_pipeline.loader import IGNORE_INDEX  # noqa: E402,F401


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over labels that are not IGNORE_INDEX, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def correct_count(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Targets (labels that are not IGNORE_INDEX) that the model ranks first: next-token accuracy's numerator."""
    return ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
