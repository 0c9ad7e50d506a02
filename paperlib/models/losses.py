"""Full-softmax cross-entropy over the whole catalogue, computed in chunks.

The all-position loss of a batch (B=256, L=200) over the ML-1M catalogue (3,417 rows) would
materialise 256·200·3417 logits (700 MB, and as much again for their gradient). This autograd
function computes ``CE(h @ Wᵀ, y)`` a chunk of rows at a time and recomputes each chunk's logits in
the backward pass, so peak memory is one chunk of logits whatever B·L is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: rows of ``h`` per chunk: 4096 rows × 3417 items × 4 B ≈ 56 MB of logits at a time
DEFAULT_CHUNK = 4096


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        # hidden (M, D), weight (V, D), targets (M,) in [0, V); returns the summed loss
        # logits in at least float32 (bf16/fp16 inputs), float64 stays float64
        acc = torch.promote_types(hidden.dtype, torch.float32)
        total = hidden.new_zeros((), dtype=acc)
        lse_all = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s : s + chunk] @ weight.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            lse_all[s : s + chunk] = lse
            picked = logits.gather(1, targets[s : s + chunk, None]).squeeze(1)
            total = total + (lse - picked).sum()
        ctx.save_for_backward(hidden, weight, targets, lse_all)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets, lse_all = ctx.saved_tensors
        chunk = ctx.chunk
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            logits = (h @ weight.t()).to(lse_all.dtype)
            # d CE / d logits = softmax - onehot
            probs = torch.exp(logits - lse_all[s : s + chunk, None])
            probs[torch.arange(h.shape[0], device=h.device), targets[s : s + chunk]] -= 1.0
            probs = (probs * grad_out).to(hidden.dtype)
            if grad_h is not None:
                grad_h[s : s + chunk] = probs @ weight
            if grad_w is not None:
                grad_w.addmm_(probs.t(), h)
        return grad_h, grad_w, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Mean cross-entropy of ``softmax(hidden @ weight.T)`` against ``targets``.

    Args:
        hidden: (M, D) representations, one row per prediction.
        weight: (V, D) output item embeddings (row 0 is padding and stays in the softmax, as in
            Mamba4Rec's official code).
        targets: (M,) item ids in ``[1, V)``.
        chunk: rows per chunk; peak extra memory is about ``chunk · V`` floats.

    Returns:
        scalar mean loss, equal to ``F.cross_entropy(hidden @ weight.T, targets)``.
    """
    if hidden.shape[0] == 0:
        raise ValueError("no targets in this batch: cannot compute a loss")
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return F.cross_entropy(hidden @ weight.t(), targets) if hidden.shape[0] <= chunk else (
            _ChunkedLinearCE.apply(hidden, weight, targets, chunk) / hidden.shape[0]
        )
    return _ChunkedLinearCE.apply(hidden, weight, targets, chunk) / hidden.shape[0]
