"""The selective scan of Mamba, with a fast, memory-lean CPU path.

Semantics and argument layout are those of ``mamba_ssm.ops.selective_scan_interface.
selective_scan_fn`` (input-dependent B and C)::

    u, delta      (batch, D, L)      D = d_inner channels, L = time
    A             (D, N)             N = d_state
    B, C          (batch, N, L)
    D             (D,)               skip connection, optional
    z             (batch, D, L)      gate, optional: y * silu(z)
    delta_bias    (D,)               added to delta before the optional softplus

    delta_t = softplus(delta_t + delta_bias)              (each channel)
    h_t     = exp(delta_t · A) ⊙ h_{t-1} + delta_t · B_t · u_t      h: (batch, D, N), h_{-1} = 0
    y_t     = <C_t, h_t> + D · u_t,      out = y · silu(z)

Backends:

* ``"reference"`` (:func:`selective_scan_reference`): a plain loop over time in PyTorch, the oracle
  of the tests. Autograd keeps one (batch, D, N) state per step, so its backward needs
  L · batch · D · N floats (about 4 GB at batch 256, L 200, D 128, N 32).
* ``"cpu"`` (:class:`_CpuScan`): numba kernels, parallel over (batch × channel), that never hold
  more than one (L, N) slice of states per worker thread. The forward keeps only the output; the
  backward recomputes each channel's states and decays into two per-job (L, N) buffers (about
  50 KB, L2-resident) and then runs the reverse-time recurrence. Grads of B and C (a sum over channels)
  are accumulated by the worker that owns the batch row, so there are no races; grads of A are
  written per (row, channel) and summed afterwards. The per-element ``exp`` of float32 uses a
  vectorisable polynomial (``2^k · p(r)``, degree-7 Taylor on |r| ≤ ln2/2, relative error ~1e-7)
  because numba has no vector math library here and scalar ``expf`` calls dominated the kernel.
  ``delta_bias``, softplus, the ``D`` skip and the ``silu(z)`` gate are applied by PyTorch around
  the kernel: they are element-wise on (batch, D, L) and autograd handles them.
* ``"cuda"``: ``mamba_ssm``'s fused kernel (``selective_scan_fn``) for CUDA tensors. It is imported
  only when asked for: ``mamba_ssm`` 2.3 raises at import without its compiled extension.

The Mamba block itself (``MambaBlock``) does not call ``selective_scan`` on CPU with the ``"cpu"``
backend: it runs everything between ``in_proj`` and ``out_proj`` through :func:`mamba_inner_cpu`,
the same computation fused in the (batch, time, channels) layout of the Linear layers around it:
a numba kernel for the causal convolution and its SiLU, ``x_proj`` and ``dt_proj`` as matrix
products, and numba kernels for the scan with the softplus derivative, the D skip and the silu(z)
gate inside, each job stepping ``LANES`` channels of one batch row at once; the forward keeps the
scan's state every ``CHUNK`` steps and the backward recomputes the states in between. Measured on
the development machine (1 thread, load average about 4.5 from other work; interleaved), a Mamba
block's forward + backward at batch 256, L 200, d 64: 2.30 s step by step, 1.31 s fused; a 2-layer
Mamba4Rec training step 7.0 s → 4.4 s. ``selective_scan`` with the kernels below stays the
scan-level API (and the oracle tests' subject).

``"auto"`` takes ``"cuda"`` for CUDA tensors when ``mamba_ssm`` imports, else ``"cpu"`` for CPU
tensors, else ``"reference"``.

Computation is in float32 (float64 inputs stay float64, for gradient checks); the output has the
dtype of ``u``, as in mamba_ssm.

Design, chosen by measurement on the 2-core development machine (Xeon Sapphire Rapids, AVX-512,
no vector math library for numba), forward + backward at batch 256, L 200, D 128, N 32, float32,
quiet machine unless noted:

* numba kernels with the polynomial ``exp`` (this module): forward kernel 0.085 s, backward kernel
  0.23 s (recompute 0.05 s, reverse recurrence 0.18 s); with the PyTorch element-wise ops around
  them 0.39 s per forward + backward, 0.2 GB peak;
* the same kernels calling scalar ``math.exp``: 0.25 s + 0.43 s of kernel time;
* numba's OpenMP threading layer instead of workqueue: 0.9-1.3 s (see _choose_threading_layer);
* the D skip and the silu(z) gate fused into the kernels: forward 0.11 s, backward 0.43 s (the
  extra scalar work in the reverse loop spoils its vectorisation), so they stay in PyTorch;
* any scan that steps through time with PyTorch ops on (batch, D, N) states (a chunked PyTorch scan
  included) pays at least the forward of the plain loop: 0.51 s without autograd, before any
  backward; the plain loop with autograd: 3.8 s and 3.9 GB (29 s on a busy machine);
* mambapy's parallel scan materialises several (batch, L, D, N) tensors: 22 s and 8.4 GB.

``paperlib bench scan`` prints these side by side.

The kernels compile on first use (about 3 s for float32 forward + backward, 2.5 s more for float64)
and numba caches them on disk: ``__pycache__`` next to this file, or ``$NUMBA_CACHE_DIR``, or
``<tmp>/paperlib-numba-cache`` when the package folder is read-only; a cached start takes 0.2 s.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference", "cpu", "cuda")


# --------------------------------------------------------------------------------------------
# argument checks shared by every backend


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, D, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D, N) with D = {dim}; got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 3 or tuple(t.shape) != (batch, n, length):
            raise ValueError(
                f"{name} must be input-dependent with shape (batch, N, L) = {(batch, n, length)}; got "
                f"{tuple(t.shape)} (input-independent or grouped B/C are not supported here)"
            )
    if D is not None and tuple(D.shape) != (dim,):
        raise ValueError(f"D must be ({dim},); got {tuple(D.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (dim,):
        raise ValueError(f"delta_bias must be ({dim},); got {tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {tuple(u.shape)}; got {tuple(z.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported")


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    # mamba_ssm computes in float32; float64 is kept for gradient checks
    return torch.float64 if u.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# reference: plain loop over time


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan as a sequential loop over time (the oracle); same signature as
    ``mamba_ssm``'s ``selective_scan_ref``.

    Returns:
        out (batch, D, L) in ``u``'s dtype; with ``return_last_state`` also h_{L-1} (batch, D, N).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    cdt = _compute_dtype(u)
    u, delta, A, B, C = (t.to(cdt) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]  # (batch, D, 1)
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


# --------------------------------------------------------------------------------------------
# numba kernels: compiled on first call, cached on disk


def _ensure_numba_cache_dir() -> None:
    """numba caches next to this file; where that folder is read-only, point it at a writable one.
    Must run before the kernels are decorated (numba picks the cache folder then)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    try:
        os.makedirs(here, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=here, prefix=".probe"):
            pass
    except OSError:
        fallback = os.path.join(tempfile.gettempdir(), "paperlib-numba-cache")
        os.makedirs(fallback, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = fallback


_ensure_numba_cache_dir()

#: the fused Mamba path's kernels step this many channels together (the inner, vectorised loops);
#: measured on the development machine: 32 lanes ran the scan 1.6x faster than 16 and 4x faster than 8
LANES = 32
#: time steps between the scan states the fused forward keeps for its backward pass
CHUNK = 64

try:
    import numba
    from llvmlite import ir as _llvm_ir
    from numba import njit, prange, types as _nbtypes
    from numba.extending import intrinsic, overload

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a pinned dependency
    HAVE_NUMBA = False

if HAVE_NUMBA:
    # numba reads NUMBA_CACHE_DIR when it is first imported; set it here as well in case it was
    # imported earlier by someone else
    if os.environ.get("NUMBA_CACHE_DIR"):
        numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

    @intrinsic
    def _pow2_int(typingctx, k):
        """2**k for an integral float32 k in [-126, 127], by writing the exponent bits (vectorises)."""
        if k != _nbtypes.float32:
            return None
        sig = _nbtypes.float32(_nbtypes.float32)

        def codegen(context, builder, signature, args):
            i32 = _llvm_ir.IntType(32)
            ki = builder.fptosi(args[0], i32)
            bits = builder.shl(builder.add(ki, _llvm_ir.Constant(i32, 127)), _llvm_ir.Constant(i32, 23))
            return builder.bitcast(bits, _llvm_ir.FloatType())

        return sig, codegen

    @njit(fastmath=True, cache=True, inline="always")
    def _exp_f32(x):
        # exp(x) = 2^k · 2^f, k = round(x / ln2), |f| ≤ 1/2; 2^f = e^r, r = f·ln2, |r| ≤ 0.347:
        # degree-7 Taylor has truncation error r^8/8! < 6e-9, below float32 rounding
        y = x * np.float32(1.4426950408889634)
        y = min(max(y, np.float32(-126.0)), np.float32(126.0))
        k = np.floor(y + np.float32(0.5))
        r = (y - k) * np.float32(0.6931471805599453)
        p = np.float32(1.0 / 5040.0) + r * np.float32(1.0 / 40320.0)
        p = np.float32(1.0 / 720.0) + r * p
        p = np.float32(1.0 / 120.0) + r * p
        p = np.float32(1.0 / 24.0) + r * p
        p = np.float32(1.0 / 6.0) + r * p
        p = np.float32(0.5) + r * p
        p = np.float32(1.0) + r * p
        p = np.float32(1.0) + r * p
        return p * _pow2_int(k)

    def _fexp(x):  # pragma: no cover - replaced by the overload inside numba
        return math.exp(x)

    @overload(_fexp, inline="always")
    def _fexp_impl(x):
        if x == _nbtypes.float32:
            return lambda x: _exp_f32(x)
        return lambda x: math.exp(x)

    @njit(parallel=True, fastmath=True, cache=True)
    def _scan_forward_kernel(u, delta, A, Bt, Ct, out, last):
        """out[b, d, t] = <C_t, h_t> for every (b, d); last[b, d] = h_{L-1}.

        u, delta, out: (batch, D, L); A: (D, N); Bt, Ct: (batch, L, N); last: (batch, D, N).
        """
        batch, dim, length = u.shape
        n_state = A.shape[1]
        for job in prange(batch * dim):
            b = job // dim
            d = job - b * dim
            h = np.zeros(n_state, dtype=u.dtype)
            a_row = A[d]
            for t in range(length):
                dt = delta[b, d, t]
                dtx = dt * u[b, d, t]
                b_row = Bt[b, t]
                c_row = Ct[b, t]
                acc = dt * 0
                for n in range(n_state):
                    hn = _fexp(dt * a_row[n]) * h[n] + dtx * b_row[n]
                    h[n] = hn
                    acc += c_row[n] * hn
                out[b, d, t] = acc
            last[b, d, :] = h

    @njit(parallel=True, fastmath=True, cache=True)
    def _scan_backward_kernel(u, delta, A, Bt, Ct, gy, n_blocks, gu, gdelta, gA_rows, gB_parts, gC_parts):
        """Reverse-time recurrence; every output below is written, not accumulated across calls.

        Inputs: u, delta, gy (batch, D, L); A (D, N); Bt, Ct (batch, L, N); n_blocks: channel blocks
        per batch row (more parallel jobs when the batch is small).
        Outputs: gu, gdelta (batch, D, L); gA_rows (batch, D, N), summed over batch by the caller;
        gB_parts, gC_parts (n_blocks, batch, L, N), zero on entry, summed over blocks by the caller.
        """
        batch, dim, length = u.shape
        n_state = A.shape[1]
        per_block = (dim + n_blocks - 1) // n_blocks
        for job in prange(batch * n_blocks):
            b = job // n_blocks
            k = job - b * n_blocks
            hs = np.empty((length + 1, n_state), dtype=u.dtype)  # hs[t + 1] = h_t, hs[0] = 0
            decay = np.empty((length, n_state), dtype=u.dtype)  # exp(delta_t · A)
            gh = np.empty(n_state, dtype=u.dtype)
            gA_acc = np.empty(n_state, dtype=u.dtype)
            gB = gB_parts[k, b]
            gC = gC_parts[k, b]
            for d in range(k * per_block, min(dim, (k + 1) * per_block)):
                a_row = A[d]
                # recompute this channel's states
                hs[0, :] = 0
                for t in range(length):
                    dt = delta[b, d, t]
                    dtx = dt * u[b, d, t]
                    b_row = Bt[b, t]
                    for n in range(n_state):
                        a = _fexp(dt * a_row[n])
                        decay[t, n] = a
                        hs[t + 1, n] = a * hs[t, n] + dtx * b_row[n]
                gh[:] = 0
                gA_acc[:] = 0
                for t in range(length - 1, -1, -1):
                    g = gy[b, d, t]
                    dt = delta[b, d, t]
                    x = u[b, d, t]
                    dtx = dt * x
                    b_row = Bt[b, t]
                    c_row = Ct[b, t]
                    gB_row = gB[t]
                    gC_row = gC[t]
                    g_dt = dt * 0
                    g_bx = dt * 0
                    for n in range(n_state):
                        h_prev = hs[t, n]
                        a = decay[t, n]
                        # dL/dh_t: from y_t and from h_{t+1} (already in gh)
                        ghn = gh[n] + g * c_row[n]
                        gC_row[n] += g * hs[t + 1, n]
                        gB_row[n] += ghn * dtx
                        g_bx += ghn * b_row[n]
                        gah = ghn * a * h_prev  # dL/d(dt·A_n) · (1/...) through exp
                        g_dt += gah * a_row[n]
                        gA_acc[n] += gah * dt
                        gh[n] = ghn * a
                    gu[b, d, t] = g_bx * dt
                    gdelta[b, d, t] = g_dt + g_bx * x
                gA_rows[b, d, :] = gA_acc

    # ---- the fused, channels-last path of the Mamba block (see mamba_inner_cpu)

    @njit(fastmath=True, cache=True, inline="always")
    def _silu_and_grad(v):
        """silu(v) = v · sigmoid(v) and its derivative sigmoid(v) · (1 + v · (1 - sigmoid(v)))."""
        one = np.float32(1.0)
        sig = one / (one + _fexp(-v))
        return v * sig, sig * (one + v * (one - sig))

    @njit(parallel=True, fastmath=True, cache=True)
    def _conv_silu_forward(xz, wT, bias, u):
        """u[b, t, d] = silu(bias[d] + Σ_k wT[k, d] · x[b, t - K + 1 + k, d]), x = xz[:, :, :E],
        zero before the first step (the causal depthwise convolution of the Mamba block).

        xz (B, L, 2E); wT (K, E); bias (E,); u (B, L, E), written.
        """
        batch, length, _ = xz.shape
        dim = u.shape[2]
        width = wT.shape[0]
        for b in prange(batch):
            acc = np.empty(dim, dtype=u.dtype)
            for t in range(length):
                for d in range(dim):
                    acc[d] = bias[d]
                for k in range(width):
                    s = t - width + 1 + k
                    if s >= 0:
                        for d in range(dim):
                            acc[d] += wT[k, d] * xz[b, s, d]
                for d in range(dim):
                    u[b, t, d] = _silu_and_grad(acc[d])[0]

    @njit(parallel=True, fastmath=True, cache=True)
    def _conv_silu_backward(xz, wT, bias, gu, gxz, gw_rows, gb_rows):
        """Gradients of :func:`_conv_silu_forward` given gu = dL/du (B, L, E).

        Writes gxz[:, :, :E] (dL/dx) and, per batch row, gw_rows (B, K, E) and gb_rows (B, E)
        (summed over rows by the caller). Runs backwards in time keeping the last K pre-activation
        gradients in a ring, since dL/dx_s needs those of steps s .. s + K - 1.
        """
        batch, length, _ = xz.shape
        dim = gu.shape[2]
        width = wT.shape[0]
        for b in prange(batch):
            acc = np.empty(dim, dtype=gu.dtype)
            ring = np.zeros((width, dim), dtype=gu.dtype)  # ring[t % K] = dL/d(pre-activation at t)
            gw = gw_rows[b]
            gb = gb_rows[b]
            gw[:, :] = 0
            gb[:] = 0
            for t in range(length - 1, -1, -1):
                for d in range(dim):
                    acc[d] = bias[d]
                for k in range(width):
                    s = t - width + 1 + k
                    if s >= 0:
                        for d in range(dim):
                            acc[d] += wT[k, d] * xz[b, s, d]
                slot = ring[t % width]
                for d in range(dim):
                    g = gu[b, t, d] * _silu_and_grad(acc[d])[1]
                    slot[d] = g
                    gb[d] += g
                for k in range(width):
                    s = t - width + 1 + k
                    if s >= 0:
                        for d in range(dim):
                            gw[k, d] += slot[d] * xz[b, s, d]
                # dL/dx_t = Σ_k wT[k] · g_pre[t + K - 1 - k]: every term is from step t or later
                for d in range(dim):
                    acc[d] = 0
                for k in range(width):
                    s = t + width - 1 - k
                    if s < length:
                        src = ring[s % width]
                        for d in range(dim):
                            acc[d] += wT[k, d] * src[d]
                for d in range(dim):
                    gxz[b, t, d] = acc[d]

    @njit(fastmath=True, cache=True, inline="always")
    def _cl_forward_block(u, delta, AT, xdbl, r, D, xz, y, last, bounds, b, d0, w):
        """The forward scan of batch row b, channels d0 .. d0 + w (w = LANES but in a last, partial
        block: called with the constant, the compiler unrolls and vectorises the lane loops)."""
        length, dim = u.shape[1], u.shape[2]
        n_state = AT.shape[0]
        keep = bounds.shape[1] > 0
        h = np.zeros((n_state, LANES), dtype=u.dtype)
        a_blk = np.zeros((n_state, LANES), dtype=u.dtype)  # this block's A, contiguous
        for n in range(n_state):
            for j in range(w):
                a_blk[n, j] = AT[n, d0 + j]
        dt = np.zeros(LANES, dtype=u.dtype)
        dtx = np.zeros(LANES, dtype=u.dtype)
        acc = np.zeros(LANES, dtype=u.dtype)
        for t in range(length):
            if keep and t % CHUNK == 0:
                for n in range(n_state):
                    for j in range(w):
                        bounds[b, t // CHUNK, n, d0 + j] = h[n, j]
            for j in range(w):
                dt[j] = delta[b, t, d0 + j]
                dtx[j] = dt[j] * u[b, t, d0 + j]
                acc[j] = 0
            for n in range(n_state):
                bn = xdbl[b, t, r + n]
                cn = xdbl[b, t, r + n_state + n]
                for j in range(w):
                    hv = _fexp(dt[j] * a_blk[n, j]) * h[n, j] + dtx[j] * bn
                    h[n, j] = hv
                    acc[j] += cn * hv
            for j in range(w):
                gate = _silu_and_grad(xz[b, t, dim + d0 + j])[0]
                y[b, t, d0 + j] = (acc[j] + D[d0 + j] * u[b, t, d0 + j]) * gate
        for n in range(n_state):
            for j in range(w):
                last[b, d0 + j, n] = h[n, j]

    @njit(parallel=True, fastmath=True, cache=True)
    def _scan_cl_forward(u, delta, AT, xdbl, r, D, xz, y, last, bounds):
        """Channels-last selective scan with the D skip and the silu(z) gate.

        u, delta, y: (B, L, E); AT: (N, E) (A transposed); xdbl: (B, L, R + 2N), B_t at columns
        r .. r + N, C_t at r + N .. r + 2N; D: (E,); xz: (B, L, 2E), z at columns E .. 2E.
        Writes y[b, t, d] = (<C_t, h_t> + D · u) · silu(z), last (B, E, N) = h_{L-1}, and, where
        bounds (B, ceil(L / CHUNK), N, E) has rows, the state before every CHUNK-th step for the
        backward pass. A job is one batch row and LANES channels, stepped together (vectorised).
        """
        batch, dim = u.shape[0], u.shape[2]
        n_blocks = (dim + LANES - 1) // LANES
        for job in prange(batch * n_blocks):
            b = job // n_blocks
            d0 = (job - b * n_blocks) * LANES
            if d0 + LANES <= dim:
                _cl_forward_block(u, delta, AT, xdbl, r, D, xz, y, last, bounds, b, d0, LANES)
            else:
                _cl_forward_block(u, delta, AT, xdbl, r, D, xz, y, last, bounds, b, d0, dim - d0)

    @njit(fastmath=True, cache=True, inline="always")
    def _cl_backward_block(u, delta, dtpre, AT, xdbl, r, D, xz, bounds, gy, gu, gdtpre, gxz, gA_rows, gD_rows,
                           gBC, b, d0, w):
        """The backward scan of batch row b, channels d0 .. d0 + w (see _cl_forward_block)."""
        length, dim = u.shape[1], u.shape[2]
        n_state = AT.shape[0]
        one = np.float32(1.0)
        a_blk = np.zeros((n_state, LANES), dtype=u.dtype)
        for n in range(n_state):
            for j in range(w):
                a_blk[n, j] = AT[n, d0 + j]
        hs = np.zeros((CHUNK + 1, n_state, LANES), dtype=u.dtype)  # hs[i + 1] = h at step t0 + i
        decay = np.zeros((CHUNK, n_state, LANES), dtype=u.dtype)
        gh = np.zeros((n_state, LANES), dtype=u.dtype)
        gA = np.zeros((n_state, LANES), dtype=u.dtype)
        dt = np.zeros(LANES, dtype=u.dtype)
        dtx = np.zeros(LANES, dtype=u.dtype)
        g = np.zeros(LANES, dtype=u.dtype)
        pre = np.zeros(LANES, dtype=u.dtype)
        g_bx = np.zeros(LANES, dtype=u.dtype)
        g_dt = np.zeros(LANES, dtype=u.dtype)
        gD = np.zeros(LANES, dtype=u.dtype)
        for c in range((length - 1) // CHUNK, -1, -1):
            t0 = c * CHUNK
            t1 = min(length, t0 + CHUNK)
            for n in range(n_state):
                for j in range(w):
                    hs[0, n, j] = bounds[b, c, n, d0 + j]
            for t in range(t0, t1):  # recompute the chunk's states and decays
                i = t - t0
                for j in range(w):
                    dt[j] = delta[b, t, d0 + j]
                    dtx[j] = dt[j] * u[b, t, d0 + j]
                for n in range(n_state):
                    bn = xdbl[b, t, r + n]
                    for j in range(w):
                        a = _fexp(dt[j] * a_blk[n, j])
                        decay[i, n, j] = a
                        hs[i + 1, n, j] = a * hs[i, n, j] + dtx[j] * bn
            for t in range(t1 - 1, t0 - 1, -1):
                i = t - t0
                for j in range(w):
                    dt[j] = delta[b, t, d0 + j]
                    dtx[j] = dt[j] * u[b, t, d0 + j]
                    pre[j] = D[d0 + j] * u[b, t, d0 + j]
                for n in range(n_state):  # the output before the gate: <C_t, h_t> + D · u
                    cn = xdbl[b, t, r + n_state + n]
                    for j in range(w):
                        pre[j] += cn * hs[i + 1, n, j]
                for j in range(w):
                    gate, dgate = _silu_and_grad(xz[b, t, dim + d0 + j])
                    gyj = gy[b, t, d0 + j]
                    gxz[b, t, dim + d0 + j] = gyj * pre[j] * dgate
                    g[j] = gyj * gate  # dL/d(pre)
                    gD[j] += g[j] * u[b, t, d0 + j]
                    g_bx[j] = 0
                    g_dt[j] = 0
                for n in range(n_state):
                    bn = xdbl[b, t, r + n]
                    cn = xdbl[b, t, r + n_state + n]
                    sB = dt[0] * 0
                    sC = dt[0] * 0
                    for j in range(w):
                        ghn = gh[n, j] + g[j] * cn  # dL/dh_t: from y_t and from h_{t+1}
                        sC += g[j] * hs[i + 1, n, j]
                        sB += ghn * dtx[j]
                        g_bx[j] += ghn * bn
                        a = decay[i, n, j]
                        gah = ghn * a * hs[i, n, j]
                        g_dt[j] += gah * a_blk[n, j]
                        gA[n, j] += gah * dt[j]
                        gh[n, j] = ghn * a
                    gBC[t, n] += sB
                    gBC[t, n_state + n] += sC
                for j in range(w):
                    gu[b, t, d0 + j] = g_bx[j] * dt[j] + g[j] * D[d0 + j]
                    sig = one / (one + _fexp(-dtpre[b, t, d0 + j]))  # softplus' = sigmoid
                    gdtpre[b, t, d0 + j] = (g_dt[j] + g_bx[j] * u[b, t, d0 + j]) * sig
        for n in range(n_state):
            for j in range(w):
                gA_rows[b, n, d0 + j] = gA[n, j]
        for j in range(w):
            gD_rows[b, d0 + j] = gD[j]

    @njit(parallel=True, fastmath=True, cache=True)
    def _scan_cl_backward(u, delta, dtpre, AT, xdbl, r, D, xz, bounds, gy, n_groups,
                          gu, gdtpre, gxz, gA_rows, gD_rows, gBC_parts):
        """Reverse-time recurrence of :func:`_scan_cl_forward`.

        Inputs as there, plus dtpre (B, L, E) (delta = softplus(dtpre)), bounds (the forward's
        states every CHUNK steps) and gy = dL/dy (B, L, E); n_groups splits each row's channel
        blocks over that many jobs (more jobs when the batch is small).
        Writes gu (B, L, E) (the scan's part of dL/du), gdtpre (B, L, E) = dL/d(dtpre), the gate's
        part gxz[:, :, E:], gA_rows (B, N, E), gD_rows (B, E), and accumulates dL/dB_t, dL/dC_t into
        gBC_parts (n_groups, B, L, 2N) (zero on entry, summed over groups by the caller).
        Within a chunk the states and decays are recomputed from the chunk's first state.
        """
        batch, dim = u.shape[0], u.shape[2]
        n_blocks = (dim + LANES - 1) // LANES
        per_group = (n_blocks + n_groups - 1) // n_groups
        for job in prange(batch * n_groups):
            b = job // n_groups
            grp = job - b * n_groups
            for blk in range(grp * per_group, min(n_blocks, (grp + 1) * per_group)):
                d0 = blk * LANES
                if d0 + LANES <= dim:
                    _cl_backward_block(u, delta, dtpre, AT, xdbl, r, D, xz, bounds, gy, gu, gdtpre, gxz, gA_rows,
                                       gD_rows, gBC_parts[grp, b], b, d0, LANES)
                else:
                    _cl_backward_block(u, delta, dtpre, AT, xdbl, r, D, xz, bounds, gy, gu, gdtpre, gxz, gA_rows,
                                       gD_rows, gBC_parts[grp, b], b, d0, dim - d0)

    @njit(parallel=True, fastmath=True, cache=True)
    def _dropout_kernel(x, out, seed, threshold, scale):
        """out[i] = x[i] · scale where element i is kept, else 0 (x, out: 1-D, same length).

        Element i is dropped when the top 32 bits of splitmix64(seed + (i + 1) · golden) fall below
        ``threshold`` = round(p · 2^32): a counter-based mask, the same for any thread count, that
        the backward pass regenerates from the seed instead of storing it.
        """
        n = x.size
        chunk = 1 << 14
        golden = np.uint64(0x9E3779B97F4A7C15)
        for c in prange((n + chunk - 1) // chunk):
            for i in range(c * chunk, min(n, (c + 1) * chunk)):
                h = seed + np.uint64(i + 1) * golden
                h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                h = h ^ (h >> np.uint64(31))
                out[i] = x[i] * scale if (h >> np.uint64(32)) >= threshold else x[i] * 0



# --------------------------------------------------------------------------------------------
# autograd function around the kernels


_LAYER_CHOSEN = False


def _choose_threading_layer() -> None:
    """Prefer numba's ``workqueue`` threads to its OpenMP layer, unless the user chose one.

    numba's OpenMP runtime is not PyTorch's (torch ships its own libgomp): after a kernel, numba's
    OpenMP workers keep spinning and starve PyTorch's threads. Measured on 2 cores, one forward +
    backward at batch 256, L 200, D 128, N 32: 0.9-1.3 s with OpenMP, 0.39 s with workqueue (the
    same as with OMP_WAIT_POLICY=passive). Must run before numba launches its first threads.
    workqueue does not support concurrent launches; the kernels hold the GIL, so calls from several
    Python threads run one after the other.
    """
    global _LAYER_CHOSEN
    if _LAYER_CHOSEN:
        return
    _LAYER_CHOSEN = True
    from numba.np.ufunc import parallel as _parallel

    if not os.environ.get("NUMBA_THREADING_LAYER") and not _parallel._is_initialized:
        os.environ["NUMBA_THREADING_LAYER"] = "workqueue"  # numba re-reads its config from the environment
        numba.config.THREADING_LAYER = "workqueue"


def _n_blocks(batch: int, dim: int) -> int:
    # enough (row, channel-block) jobs to keep every thread busy when the batch is small
    threads = numba.get_num_threads() if HAVE_NUMBA else 1
    return max(1, min(dim, -(-4 * threads // batch)))


class _CpuScan(torch.autograd.Function):
    """y[b, d, t] = <C_t, h_t> (no skip, no gate) on CPU tensors of one float dtype.

    forward(u (batch, D, L), delta (batch, D, L) after bias/softplus, A (D, N), B (batch, N, L),
    C (batch, N, L)) -> (y (batch, D, L), last state (batch, D, N), not differentiable).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        _choose_threading_layer()
        u = u.detach().contiguous()
        delta = delta.detach().contiguous()
        A = A.detach().contiguous()
        B, C = B.detach(), C.detach()
        Bt = B.transpose(1, 2).contiguous()  # (batch, L, N): one time step's vector is contiguous
        Ct = C.transpose(1, 2).contiguous()
        batch, dim, _ = u.shape
        y = torch.empty_like(u)
        last = u.new_empty(batch, dim, A.shape[1])
        _scan_forward_kernel(u.numpy(), delta.numpy(), A.numpy(), Bt.numpy(), Ct.numpy(), y.numpy(), last.numpy())
        ctx.save_for_backward(u, delta, A, Bt, Ct)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, gy, _glast):
        u, delta, A, Bt, Ct = ctx.saved_tensors
        batch, dim, length = u.shape
        n_state = A.shape[1]
        gy = torch.zeros_like(u) if gy is None else gy.to(u.dtype).contiguous()
        blocks = _n_blocks(batch, dim)
        gu = torch.empty_like(u)
        gdelta = torch.empty_like(u)
        gA_rows = u.new_empty(batch, dim, n_state)
        gB_parts = u.new_zeros(blocks, batch, length, n_state)
        gC_parts = u.new_zeros(blocks, batch, length, n_state)
        _scan_backward_kernel(
            u.numpy(), delta.numpy(), A.numpy(), Bt.numpy(), Ct.numpy(), gy.numpy(), blocks,
            gu.numpy(), gdelta.numpy(), gA_rows.numpy(), gB_parts.numpy(), gC_parts.numpy(),
        )  # fmt: skip
        gB = gB_parts[0] if blocks == 1 else gB_parts.sum(0)
        gC = gC_parts[0] if blocks == 1 else gC_parts.sum(0)
        return gu, gdelta, gA_rows.sum(0), gB.transpose(1, 2), gC.transpose(1, 2)


def selective_scan_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with the numba kernels (CPU tensors); differentiable w.r.t. every tensor
    argument. Same signature and result as :func:`selective_scan_reference`."""
    if not HAVE_NUMBA:
        raise RuntimeError("the 'cpu' selective-scan backend needs numba (pip install numba)")
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("the 'cpu' selective-scan backend needs CPU tensors; use backend='auto' or 'cuda'")
    dtype_in = u.dtype
    cdt = _compute_dtype(u)
    u_c, delta, A_c, B_c, C_c = (t.to(cdt) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y, last = _CpuScan.apply(u_c, delta, A_c, B_c, C_c)
    if D is not None:
        y = y + u_c * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y


# --------------------------------------------------------------------------------------------
# the fused, channels-last path of the Mamba block between in_proj and out_proj (CPU)


class _MambaInner(torch.autograd.Function):
    """xz (B, L, 2E) → y (B, L, E): causal depthwise conv + SiLU, x_proj, dt_proj + softplus, the
    selective scan, the D skip and the silu(z) gate, with a hand-written backward pass.

    Tensors are (batch, time, channels), the layout of the Linear layers around the block, so no
    transposed copy is made; the conv and the scan are numba kernels that step LANES channels at once;
    the forward keeps the scan's state every CHUNK steps and the backward recomputes the states in
    between. Saved for backward: xz, u, x_proj's output, dt_proj's output and delta (B, L, E each
    but the small x_proj output) and the chunk states.
    """

    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A, D, training):
        _choose_threading_layer()
        batch, length, two_e = xz.shape
        dim, n_state = A.shape
        rank = dt_proj_w.shape[1]
        xz = xz.detach().contiguous()
        wT = conv_w.detach().t().contiguous()  # (K, E)
        bias = conv_b.detach().contiguous()
        u = xz.new_empty(batch, length, dim)
        _conv_silu_forward(xz.numpy(), wT.numpy(), bias.numpy(), u.numpy())
        x_dbl = u.view(-1, dim) @ x_proj_w.detach().t()  # (B·L, R + 2N)
        dtpre = torch.addmm(dt_proj_b.detach(), x_dbl[:, :rank], dt_proj_w.detach().t())  # (B·L, E)
        delta = F.softplus(dtpre)
        AT = A.detach().t().contiguous()
        Dc = D.detach().contiguous()
        y = xz.new_empty(batch, length, dim)
        last = xz.new_empty(batch, dim, n_state)
        bounds = xz.new_empty(batch, -(-length // CHUNK) if training else 0, n_state, dim)
        _scan_cl_forward(u.numpy(), delta.view(batch, length, dim).numpy(), AT.numpy(),
                         x_dbl.view(batch, length, -1).numpy(), rank, Dc.numpy(), xz.numpy(), y.numpy(),
                         last.numpy(), bounds.numpy())
        if training:
            ctx.save_for_backward(xz, wT, bias, u, x_dbl, dtpre, delta, AT, Dc, bounds,
                                  x_proj_w.detach(), dt_proj_w.detach())
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, gy, _glast):
        xz, wT, bias, u, x_dbl, dtpre, delta, AT, D, bounds, x_proj_w, dt_proj_w = ctx.saved_tensors
        batch, length, dim = u.shape
        n_state = AT.shape[0]
        rank = dt_proj_w.shape[1]
        gy = torch.zeros_like(u) if gy is None else gy.to(u.dtype).contiguous()
        groups = _n_blocks(batch, -(-dim // LANES))
        gxz = torch.empty_like(xz)
        gu = torch.empty_like(u)
        gdtpre = torch.empty_like(u)
        gA_rows = u.new_empty(batch, n_state, dim)
        gD_rows = u.new_empty(batch, dim)
        gBC = u.new_zeros(groups, batch, length, 2 * n_state)
        _scan_cl_backward(
            u.numpy(), delta.view(batch, length, dim).numpy(), dtpre.view(batch, length, dim).numpy(), AT.numpy(),
            x_dbl.view(batch, length, -1).numpy(), rank, D.numpy(), xz.numpy(), bounds.numpy(), gy.numpy(), groups,
            gu.numpy(), gdtpre.numpy(), gxz.numpy(), gA_rows.numpy(), gD_rows.numpy(), gBC.numpy(),
        )  # fmt: skip
        gdt_flat = gdtpre.view(-1, dim)
        g_xdbl = torch.empty_like(x_dbl)  # (B·L, R + 2N)
        torch.mm(gdt_flat, dt_proj_w, out=g_xdbl[:, :rank])
        g_xdbl[:, rank:] = (gBC[0] if groups == 1 else gBC.sum(0)).view(-1, 2 * n_state)
        g_dt_w = gdt_flat.t() @ x_dbl[:, :rank]
        g_dt_b = gdt_flat.sum(0)
        gu_flat = gu.view(-1, dim)
        gu_flat.addmm_(g_xdbl, x_proj_w)  # x_proj's part of dL/du
        g_xproj_w = g_xdbl.t() @ u.view(-1, dim)
        width = wT.shape[0]
        gw_rows = u.new_empty(batch, width, dim)
        gb_rows = u.new_empty(batch, dim)
        _conv_silu_backward(xz.numpy(), wT.numpy(), bias.numpy(), gu.numpy(), gxz.numpy(), gw_rows.numpy(),
                            gb_rows.numpy())
        return (gxz, gw_rows.sum(0).t(), gb_rows.sum(0), g_xproj_w, g_dt_w, g_dt_b, gA_rows.sum(0).t(),
                gD_rows.sum(0), None)


def mamba_inner_cpu(
    xz: torch.Tensor,
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    x_proj_w: torch.Tensor,
    dt_proj_w: torch.Tensor,
    dt_proj_b: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba block between ``in_proj`` and ``out_proj``, fused on CPU (the numba kernels).

    Computes what ``MambaBlock``'s unfused path computes (conv1d + SiLU, x_proj, dt_proj, and
    ``selective_scan`` with softplus, D and the gate), differentiable w.r.t. every tensor:

        xz (B, L, 2E): in_proj's output, x = xz[..., :E], z = xz[..., E:]
        conv_w (E, K), conv_b (E,) or None: the depthwise causal convolution
        x_proj_w (R + 2N, E); dt_proj_w (E, R); dt_proj_b (E,); A (E, N); D (E,)

    Returns y (B, L, E) (gated, before out_proj) and the last SSM state (B, E, N) (not
    differentiable). float32 or float64 CPU tensors of one dtype.
    """
    if not HAVE_NUMBA:
        raise RuntimeError("the fused CPU path of the Mamba block needs numba (pip install numba)")
    dim, n_state = A.shape
    if xz.dim() != 3 or xz.shape[2] != 2 * dim:
        raise ValueError(f"xz must be (batch, L, 2E) with E = {dim}; got {tuple(xz.shape)}")
    if conv_b is None:
        conv_b = conv_w.new_zeros(dim)
    tensors = (xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A, D)
    # keep what the backward pass needs only when there will be one (ctx cannot tell under no_grad)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return _MambaInner.apply(*tensors, training)


# --------------------------------------------------------------------------------------------
# dropout with a counter-based mask (Mamba4Rec's CPU path)


class _HashDropout(torch.autograd.Function):
    """Inverted dropout whose mask is a hash of (seed, element index): forward and backward run the
    same kernel, so the mask is never stored."""

    @staticmethod
    def forward(ctx, x, p, seed):
        _choose_threading_layer()
        ctx.keep = (seed, int(round(p * 2**32)), 1.0 / (1.0 - p))
        return _apply_mask(x.detach(), *ctx.keep)

    @staticmethod
    def backward(ctx, grad):
        return _apply_mask(grad, *ctx.keep), None, None


def _apply_mask(x: torch.Tensor, seed: int, threshold: int, scale: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _dropout_kernel(x.view(-1).numpy(), out.view(-1).numpy(), np.uint64(seed), np.uint64(threshold),
                    x.new_tensor(scale).numpy()[()])
    return out


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with a cheaper mask on CPU: each element is dropped with
    probability p (to 2⁻³²) and the rest scaled by 1 / (1 - p), as ``F.dropout`` does; the mask is a
    hash of the element's index and a seed drawn from torch's global generator (so
    ``torch.manual_seed`` makes it reproducible), computed in parallel and regenerated in the
    backward pass instead of stored.

    Measured on the 2-core development machine (1 thread, load average 3.7 from other work): the
    seven dropouts of a 2-layer Mamba4Rec training step at batch 256, L 200 (43 M elements, forward
    and backward) took 0.98 s with ``F.dropout`` (``aten::bernoulli_`` draws one number per element
    from a sequential generator) and 0.46 s here, most of it the page faults of the new output
    tensors (the mask itself costs about 0.6 ns an element).

    Where the kernel does not apply (not training, p = 0, a GPU tensor, a dtype other than float32 or
    float64, no numba) it is ``F.dropout`` itself.
    """
    if (not training or p == 0.0 or not HAVE_NUMBA or x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.float64)):
        return F.dropout(x, p, training)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return _HashDropout.apply(x, p, seed)


# --------------------------------------------------------------------------------------------
# mamba_ssm (CUDA) and the dispatcher


@functools.lru_cache(maxsize=1)
def _import_mamba_ssm_scan():
    """mamba_ssm's ``selective_scan_fn``, or None where mamba_ssm or its CUDA extension is missing
    (tried once per process)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError, RuntimeError):
        return None
    return selective_scan_fn


def available_backends() -> list[str]:
    """Backends usable in this process: "reference" always, "cpu" with numba, "cuda" with a GPU
    and an importable ``mamba_ssm``."""
    names = ["reference"]
    if HAVE_NUMBA:
        names.append("cpu")
    if torch.cuda.is_available() and _import_mamba_ssm_scan() is not None:
        names.append("cuda")
    return names


def resolve_backend(backend: str, u: torch.Tensor) -> str:
    """The backend ``selective_scan`` would use for tensors like ``u``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if u.device.type == "cuda":
        return "cuda" if _import_mamba_ssm_scan() is not None else "reference"
    if u.device.type == "cpu" and HAVE_NUMBA:
        return "cpu"
    return "reference"


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan, ``mamba_ssm``'s ``selective_scan_fn`` semantics (see the module docstring).

    Args:
        u, delta: (batch, D, L). A: (D, N). B, C: (batch, N, L). D, delta_bias: (D,) or None.
        z: (batch, D, L) gate or None. delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the final state (batch, D, N) (not differentiable).
        backend: "auto", "reference", "cpu" or "cuda".

    Returns:
        out (batch, D, L) in ``u``'s dtype (and the last state when asked).
    """
    chosen = resolve_backend(backend, u)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if chosen == "reference":
        return selective_scan_reference(*args)
    if chosen == "cpu":
        return selective_scan_cpu(*args)
    if u.device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            "selective-scan backend 'cuda' needs CUDA tensors on a GPU "
            f"(got a {u.device.type} tensor; torch.cuda.is_available() = {torch.cuda.is_available()}); "
            "use backend='auto' or 'cpu'"
        )
    fn = _import_mamba_ssm_scan()
    if fn is None:
        raise RuntimeError(
            "selective-scan backend 'cuda' needs mamba_ssm with its CUDA extension "
            "(pip install mamba-ssm==2.3.2.post1 on a CUDA machine); use backend='auto' for the fallback"
        )
    return fn(*args)
