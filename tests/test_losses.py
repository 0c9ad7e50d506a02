"""The chunked, fused full-softmax cross-entropy equals torch's cross-entropy in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from paperlib.models.losses import chunked_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 128, 5000])
def test_matches_cross_entropy(chunk):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(300, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(1, 40, (300,), generator=g)
    ours = chunked_cross_entropy(h * 2, w, y, chunk=chunk)  # non-leaf input, like a model's output
    (ours * 3).backward()  # an upstream gradient other than 1
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h * 2) @ w.t(), y)
    (ref * 3).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-10, atol=1e-12)


def test_float32_and_frozen_table():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1000, 32, generator=g, requires_grad=True)
    w = torch.randn(500, 32, generator=g)  # no grad for the table
    y = torch.randint(0, 500, (1000,), generator=g)
    ours = chunked_cross_entropy(h, w, y, chunk=64)
    ours.backward()
    gh = h.grad.clone()
    h.grad = None
    F.cross_entropy(h @ w.t(), y).backward()
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-6)


def test_no_grad_value_and_empty():
    h, w = torch.randn(10, 4), torch.randn(6, 4)
    y = torch.randint(1, 6, (10,))
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(h, w, y, chunk=3), F.cross_entropy(h @ w.t(), y))
    with pytest.raises(ValueError, match="no targets"):
        chunked_cross_entropy(h[:0], w, y[:0])
