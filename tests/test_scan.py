"""The selective scan: the numba CPU path against the sequential reference and against mambapy."""

from __future__ import annotations

import os

import pytest
import torch

from paperlib.models import scan
from paperlib.models.scan import selective_scan, selective_scan_cpu, selective_scan_reference


def _inputs(batch=2, dim=5, length=13, n=8, dtype=torch.float32, seed=0, positive_delta=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    delta = torch.rand(batch, dim, length, generator=g, dtype=dtype) if positive_delta else torch.randn(
        batch, dim, length, generator=g, dtype=dtype
    ) * 0.5
    return dict(
        u=rnd(batch, dim, length),
        delta=delta.requires_grad_(),
        # A < 0 as in Mamba (A = -exp(A_log)), spread over a few orders of magnitude
        A=(-torch.exp(torch.randn(dim, n, generator=g, dtype=dtype))).requires_grad_(),
        B=rnd(batch, n, length),
        C=rnd(batch, n, length),
        D=rnd(dim),
        z=rnd(batch, dim, length),
        delta_bias=rnd(dim, scale=0.5),
    )


def _run(fn, inp, use, softplus, weights):
    """Output and gradients of sum(out * weights) w.r.t. every tensor used."""
    kw = {k: (v if k in use else None) for k, v in inp.items() if k in ("D", "z", "delta_bias")}
    out = fn(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], delta_softplus=softplus, **kw)
    wrt = [v for k, v in inp.items() if k in ("u", "delta", "A", "B", "C") or k in use]
    grads = torch.autograd.grad((out * weights).sum(), wrt)
    return out.detach(), grads


def _assert_cpu_matches_reference(inp, use, softplus, weights):
    """float32: outputs and every gradient of the CPU kernels equal the reference loop's."""
    out_c, g_c = _run(selective_scan_cpu, inp, use, softplus, weights)
    out_r, g_r = _run(selective_scan_reference, inp, use, softplus, weights)
    torch.testing.assert_close(out_c, out_r, rtol=1e-4, atol=1e-5)
    assert len(g_c) == len(g_r)
    for a, b in zip(g_c, g_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


OPTIONS = [
    (set(), False),
    ({"D"}, False),
    ({"z"}, False),
    ({"delta_bias"}, True),
    ({"D", "z", "delta_bias"}, True),
    ({"D", "z"}, True),
]


@pytest.mark.parametrize("use,softplus", OPTIONS)
def test_cpu_matches_reference_float32(use, softplus):
    inp = _inputs(positive_delta=not softplus)
    weights = torch.randn(2, 5, 13, generator=torch.Generator().manual_seed(1))
    _assert_cpu_matches_reference(inp, use, softplus, weights)


def test_cpu_matches_reference_small_batch_many_channels():
    """batch 1: the backward splits channels into blocks and sums the B/C grads over blocks."""
    inp = _inputs(batch=1, dim=33, length=7, n=4, seed=3)
    weights = torch.randn(1, 33, 7, generator=torch.Generator().manual_seed(2))
    use = {"D", "z", "delta_bias"}
    _assert_cpu_matches_reference(inp, use, True, weights)


def test_cpu_float64_matches_reference_and_gradcheck():
    inp = _inputs(batch=2, dim=3, length=6, n=4, dtype=torch.float64)
    weights = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    use = {"D", "z", "delta_bias"}
    out_c, g_c = _run(selective_scan_cpu, inp, use, True, weights)
    out_r, g_r = _run(selective_scan_reference, inp, use, True, weights)
    assert out_c.dtype == torch.float64
    torch.testing.assert_close(out_c, out_r, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_c, g_r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]

    def f(*tensors):
        kw = dict(zip(names, tensors))
        return selective_scan_cpu(**kw, delta_softplus=True)

    assert torch.autograd.gradcheck(f, tuple(inp[k] for k in names), eps=1e-6, atol=1e-6)


def test_last_state_and_float32_dtype_contract():
    inp = _inputs()
    with torch.no_grad():
        args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        out_c, last_c = selective_scan_cpu(*args, delta_softplus=True, return_last_state=True)
        out_r, last_r = selective_scan_reference(*args, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(last_c, last_r, rtol=1e-4, atol=1e-5)
    assert out_c.dtype == torch.float32 and last_c.shape == (2, 5, 8)
    # bfloat16 inputs are computed in float32 and returned in bfloat16, as mamba_ssm does
    bf = [a.detach().to(torch.bfloat16) for a in args]
    out_bf = selective_scan_cpu(*bf, delta_softplus=True)
    assert out_bf.dtype == torch.bfloat16


def _mambapy_scan(u, delta, A, B, C, D):
    """mambapy's parallel-scan selective scan (its own code), in our (batch, D, L) layout."""
    from mambapy.mamba import MambaBlock as PyBlock

    y = PyBlock.selective_scan(None, u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D)
    return y.transpose(1, 2)


def test_cpu_matches_mambapy_pscan_with_gradients():
    inp = _inputs(batch=3, dim=6, length=20, n=8, positive_delta=True, seed=5)
    weights = torch.randn(3, 6, 20, generator=torch.Generator().manual_seed(4))
    wrt = [inp[k] for k in ("u", "delta", "A", "B", "C", "D")]
    ours = selective_scan_cpu(*wrt)
    g_ours = torch.autograd.grad((ours * weights).sum(), wrt)
    theirs = _mambapy_scan(*wrt)
    g_theirs = torch.autograd.grad((theirs * weights).sum(), wrt)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_dispatcher():
    inp = _inputs()
    u = inp["u"]
    assert scan.resolve_backend("auto", u) == "cpu"
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        scan.resolve_backend("triton", u)
    args = [inp[k].detach() for k in ("u", "delta", "A", "B", "C")]
    torch.testing.assert_close(selective_scan(*args), selective_scan_reference(*args), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        selective_scan(*args, backend="reference"), selective_scan_reference(*args), rtol=0, atol=0
    )
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda' needs CUDA tensors"):
            selective_scan(*args, backend="cuda")


def test_mamba_ssm_import_is_guarded():
    """Importing our module never imports mamba_ssm; asking for it without CUDA gives None, not a crash."""
    import sys

    assert "mamba_ssm" not in sys.modules or torch.cuda.is_available()
    fn = scan._import_mamba_ssm_scan()
    assert fn is None or torch.cuda.is_available()


def test_bad_shapes_raise_clear_errors():
    inp = {k: v.detach() for k, v in _inputs().items()}
    with pytest.raises(ValueError, match="input-dependent"):
        selective_scan_cpu(inp["u"], inp["delta"], inp["A"], inp["B"][0], inp["C"])
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_cpu(inp["u"], inp["delta"], inp["A"].t(), inp["B"], inp["C"])


def test_numba_cache_falls_back_to_a_writable_folder(monkeypatch, tmp_path):
    """Where the package folder is read-only, the numba cache goes to a temporary folder."""
    import tempfile

    # setenv first so that the variable set by the function is undone after the test
    monkeypatch.setenv("NUMBA_CACHE_DIR", "")
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    scan._ensure_numba_cache_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "paperlib-numba-cache")
    assert (tmp_path / "paperlib-numba-cache").is_dir()
