"""Full-softmax cross-entropy over the whole catalogue, computed in chunks.

The all-position loss of a batch (B=256, L=200) over the ML-1M catalogue (3,417 rows) would
materialise 256·200·3417 logits (700 MB, and as much again for their gradient). Here the logits
exist one chunk of rows at a time, and the gradient with respect to the hidden states and the item
table is computed in the same pass as the loss (as Liger-Kernel's fused linear cross-entropy does):
the backward pass only scales the stored gradients, so the logits are never recomputed.

Measured on 2 cores (51,200 rows × 3,417 items × 64, loss + backward): recomputing the logits in
the backward pass with 4,096-row chunks took 1.13 s; the fused pass with 512-row chunks 0.36 s
(smaller chunks keep the logits in cache).
"""

from __future__ import annotations

import torch

#: rows of ``h`` per chunk: 512 rows × 3417 items × 4 B ≈ 7 MB of logits at a time (cache-sized)
DEFAULT_CHUNK = 512


def _ce_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, grad_h: bool, grad_w: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed CE of ``hidden @ weight.T`` against ``targets`` and, if asked, its gradients."""
    # logits in at least float32 (bf16/fp16 inputs); float64 stays float64 for gradient checks
    acc = torch.promote_types(hidden.dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_h else None
    d_weight = torch.zeros_like(weight) if grad_w else None
    rows = torch.arange(chunk, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk], targets[s : s + chunk]
        logits = (h @ weight.t()).to(acc)
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
        if grad_h or grad_w:
            # d CE / d logits = softmax - onehot, formed in place of the logits
            probs = logits.sub_(lse[:, None]).exp_()
            probs[rows[: h.shape[0]], t] -= 1.0
            probs = probs.to(hidden.dtype)
            if d_hidden is not None:
                torch.mm(probs, weight, out=d_hidden[s : s + chunk])
            if d_weight is not None:
                d_weight.addmm_(probs.t(), h)
    return total, d_hidden, d_weight


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        total, d_hidden, d_weight = _ce_sum(
            hidden, weight, targets, chunk, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(d_hidden, d_weight)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        d_hidden, d_weight = ctx.saved_tensors
        gh = d_hidden * grad_out.to(d_hidden.dtype) if d_hidden is not None else None
        gw = d_weight * grad_out.to(d_weight.dtype) if d_weight is not None else None
        return gh, gw, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Mean cross-entropy of ``softmax(hidden @ weight.T)`` against ``targets``.

    Args:
        hidden: (M, D) representations, one row per prediction.
        weight: (V, D) output item embeddings (row 0 is padding and stays in the softmax, as in
            Mamba4Rec's official code).
        targets: (M,) item ids in ``[0, V)``.
        chunk: rows per chunk; peak extra memory is about ``chunk · V`` floats.

    Returns:
        scalar mean loss, equal to ``F.cross_entropy(hidden @ weight.T, targets)``. Its gradient is
        computed with the loss (first-order only: no double backward).
    """
    if hidden.shape[0] == 0:
        raise ValueError("no targets in this batch: cannot compute a loss")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCE.apply(hidden, weight, targets, chunk) / hidden.shape[0]
    total, _, _ = _ce_sum(hidden, weight, targets, chunk, False, False)
    return total / hidden.shape[0]
