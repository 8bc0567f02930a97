"""Cross-entropy from hidden states and the output head, a chunk of tokens at a time.

Full logits are batch x seq x vocab: at micro-batch 4, seq 2048 and a 128k vocabulary that is 4 GB in
fp32, and autograd keeps their softmax too. `linear_cross_entropy` computes the head's matmul, the loss
and its gradients chunk by chunk in the forward pass, keeping only the gradients of the hidden states
and of the head's weight for the backward (the weight's gradient exists anyway): at most one chunk of
fp32 logits is alive at a time. The loss (a sum over targets) and the gradients are those of
`F.cross_entropy` on the full fp32 logits, up to summation order.

Chunks hold CHUNK_ELEMENTS logits (chunk rows = CHUNK_ELEMENTS / vocab): memory per chunk is fixed
whatever the sequence length or micro-batch; the number of chunks grows with the tokens per micro-batch.
"""

from __future__ import annotations

import functools

import torch

IGNORE_INDEX = -100  # labels that carry no loss (data_pipeline.loader.IGNORE_INDEX)
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
        correct = torch.zeros((), dtype=torch.int64, device=h.device)
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
        ctx.mark_non_differentiable(correct)
        return loss, correct  # (correct predictions are counted in evaluation, not here: zero)

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed fp32 cross-entropy of h @ weight.T against labels, count of correct argmax predictions,
    counted only without gradients, i.e. in evaluation);
    h (tokens, dim), weight (vocab, dim), labels (tokens,) with IGNORE_INDEX for no target.
    compiled: each chunk's matmul and softmax through torch.compile (one graph for every chunk)."""
    rows = chunk_rows(weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        fn = _compiled_chunk() if compiled else _chunk_loss_and_grad_logits
        return _LinearCrossEntropy.apply(h, weight, labels, rows, fn)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    correct = torch.zeros((), dtype=torch.int64, device=h.device)
    for start in range(0, h.shape[0], rows):
        chunk_loss, chunk_correct = _chunk_loss(h[start:start + rows], weight, labels[start:start + rows])
        loss, correct = loss + chunk_loss, correct + chunk_correct
    return loss, correct


@functools.cache
def _compiled_chunk():
    return torch.compile(_chunk_loss_and_grad_logits)
