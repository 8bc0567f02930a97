"""The language-modelling loss, in one place: summed cross-entropy over next-token targets, for training and
evaluation, on every layout and both backends. The model returns hidden states or logits; this module
turns them into a loss (`LanguageModelLoss`, its way fixed at construction).

Chunked (the default): full logits are batch x seq x vocab: at micro-batch 4, seq 2048 and a 128k
vocabulary that is 4 GB in fp32, and autograd keeps their softmax too. `linear_cross_entropy` computes
the head's matmul, the loss and its gradients chunk by chunk in the forward pass, keeping only the
gradients of the hidden states and of the head's weight for the backward (the weight's gradient exists
anyway): at most one chunk of fp32 logits is alive at a time. The loss and the gradients are those of
`F.cross_entropy` on the full fp32 logits, up to summation order.

Chunks hold CHUNK_ELEMENTS logits (chunk rows = CHUNK_ELEMENTS / vocab): memory per chunk is fixed
whatever the sequence length or micro-batch; the number of chunks grows with the tokens per micro-batch.

The other ways: under tensor parallelism the head's logits are sharded over the vocabulary and torch's
loss_parallel computes the loss on the shards (never gathering them); under ZeRO-3 the head's weight
exists only inside its own forward, so each chunk calls the head and is recomputed in the backward; and
full fp32 logits, bench/gpu.py's reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

# Labels equal to IGNORE_INDEX carry no loss (prompt tokens in fine-tuning); the loader sets them.
from data_pipeline.loader import IGNORE_INDEX

CHUNK_ELEMENTS = 2**24  # 64 MiB of fp32 logits per chunk (128 rows at a 128k vocabulary)


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _chunk_loss_and_grad_logits(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """One chunk in training: (summed loss, d loss / d logits in h's dtype). Softmax is taken in place
    over the fp32 logits (max-shifted, as logsumexp does), so one chunk-sized buffer is all it needs."""
    logits = (h @ weight.t()).float()
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)[:, None]
    target_logit = logits.gather(1, safe).squeeze(1)
    shift = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(shift).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    lse = (shift + total.log()).squeeze(1)
    loss = ((lse - target_logit) * valid).sum()
    # softmax - one_hot(target), zero for ignored rows.
    grad = probs.div_(total)
    grad.scatter_add_(1, safe, torch.full_like(target_logit[:, None], -1.0))
    grad.mul_(valid[:, None])
    return loss, grad.to(h.dtype)


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    logits = (h @ weight.t()).float()
    valid = labels != IGNORE_INDEX
    loss = ((torch.logsumexp(logits, -1) - logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)) * valid).sum()
    return loss, ((logits.argmax(-1) == labels) & valid).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, rows, chunk_fn):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, h.shape[0], rows):
            hc = h[start:start + rows]
            chunk_loss, grad_logits = chunk_fn(hc, weight, labels[start:start + rows])
            loss += chunk_loss
            grad_h[start:start + rows] = grad_logits @ weight
            grad_w.addmm_(grad_logits.t().to(torch.float32), hc.to(torch.float32))
            del grad_logits  # before the next chunk's logits: one chunk alive at a time
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         compiled: bool = False) -> torch.Tensor:
    """Summed fp32 cross-entropy of h @ weight.T against labels, with gradients for h and weight;
    h (tokens, dim), weight (vocab, dim), labels (tokens,) with IGNORE_INDEX for no target.
    compiled: each chunk's matmul and softmax through torch.compile (one graph for every chunk)."""
    fn = _compiled_chunk() if compiled else _chunk_loss_and_grad_logits
    return _LinearCrossEntropy.apply(h, weight, labels, chunk_rows(weight.shape[0]), fn)


@torch.no_grad()
def linear_cross_entropy_sums(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> LossSums:
    """linear_cross_entropy's loss and the count of correct argmax predictions, without gradients
    (evaluation), a chunk at a time."""
    rows = chunk_rows(weight.shape[0])
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    correct = torch.zeros((), dtype=torch.int64, device=h.device)
    for start in range(0, h.shape[0], rows):
        chunk_loss, chunk_correct = _chunk_loss(h[start:start + rows], weight, labels[start:start + rows])
        loss, correct = loss + chunk_loss, correct + chunk_correct
    return LossSums(loss, correct)


@functools.cache
def _compiled_chunk():
    return torch.compile(_chunk_loss_and_grad_logits)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over labels that are not IGNORE_INDEX, computed in fp32 from full logits
    (or, inside torch's loss_parallel, from vocabulary-sharded ones)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def correct_count(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Targets (labels that are not IGNORE_INDEX) that the model ranks first: next-token accuracy's numerator."""
    return ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()


@dataclass(frozen=True)
class LossSums:
    """Evaluation's sums over a batch, on the device: token loss and correctly predicted targets."""

    loss: torch.Tensor
    correct: torch.Tensor


class LossHead(nn.Linear):
    """The output projection with the chunked loss inside its own forward, so that whatever wraps the
    head (FSDP's unit of norm and head, ZeRO-3's partitioned weight, gathered around the head's forward)
    sees one ordinary call. Called with hidden states alone it returns logits, as the plain head does."""

    def __init__(self, in_features: int, out_features: int, compiled: bool = False, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)
        self.compiled = compiled

    @classmethod
    def taking(cls, head: nn.Linear, compiled: bool) -> LossHead:
        """A LossHead holding `head`'s weight (the same Parameter: a tied embedding stays tied)."""
        loss_head = cls(head.in_features, head.out_features, compiled, device="meta")
        loss_head.weight = head.weight
        return loss_head

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None, sums: bool = False):
        """Logits; with labels, the summed token loss (gradients flow); with sums too, evaluation's
        LossSums (no gradients)."""
        if labels is None:
            return super().forward(h)
        if sums:
            return linear_cross_entropy_sums(h.flatten(0, 1), self.weight, labels.flatten())
        return linear_cross_entropy(h.flatten(0, 1), self.weight, labels.flatten(), self.compiled)


FUSED, SHARDED_LOGITS, FULL_LOGITS = "fused", "sharded_logits", "full_logits"


class LanguageModelLoss:
    """The loss of a model part's output against its labels, its way fixed at construction:

        fused            the part returns its final hidden states and its LossHead computes the loss a
                         chunk at a time (`prepare` gives the part that head before parallelism)
        sharded_logits   from vocabulary-sharded logits (tensor parallelism; call inside loss_parallel())
        full_logits      from full fp32 logits (bench/gpu.py's reference)
    """

    def __init__(self, way: str = FUSED, compiled: bool = False):
        if way not in (FUSED, SHARDED_LOGITS, FULL_LOGITS):
            raise ValueError(f"unknown loss way {way!r}")
        self.way, self.compiled = way, compiled

    @classmethod
    def for_run(cls, tp: int, compiled: bool) -> LanguageModelLoss:
        """A run's loss: fused, or from sharded logits under tensor parallelism (tp > 1)."""
        return cls(SHARDED_LOGITS if tp > 1 else FUSED, compiled)

    @property
    def wants_hidden(self) -> bool:
        """The model part is called with return_hidden=True: the head runs here."""
        return self.way == FUSED

    def prepare(self, part: nn.Module) -> None:
        """Before parallelism is applied (on the meta device): a part with the output head gets a LossHead."""
        if self.way == FUSED and part.output is not None and not isinstance(part.output, LossHead):
            part.output = LossHead.taking(part.output, self.compiled)

    def __call__(self, head: nn.Module, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed token loss (training: gradients flow to the output and the head)."""
        if self.way == FUSED:
            return head(output, labels)
        loss = loss_sum(output, labels)
        return loss.to_local() if isinstance(loss, DTensor) else loss

    @torch.no_grad()
    def sums(self, head: nn.Module, output: torch.Tensor, labels: torch.Tensor) -> LossSums:
        """Summed token loss and correct predictions, without gradients (evaluation)."""
        if self.way == FUSED:
            return head(output, labels, sums=True)
        full = output.full_tensor() if isinstance(output, DTensor) else output  # (TP: the count gathers)
        return LossSums(self(head, output, labels), correct_count(full, labels))


def row_sums(loss: LanguageModelLoss, head: nn.Module, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed loss, correct predictions] of one row (1, seq, ...), fp32: a downstream task's request."""
    sums = loss.sums(head, output, labels)
    return torch.stack([sums.loss.float(), sums.correct.float()])
