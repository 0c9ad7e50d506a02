"""The Mamba block, with the parameter names, shapes and initialisation of ``mamba_ssm.Mamba``.

A state dict moves unchanged between this block, ``mamba_ssm.Mamba`` (GPU) and mambapy's
``MambaBlock``; the selective scan runs on the backend chosen in :mod:`paperlib.models.scan`. On CPU
with the ``"cpu"`` backend, the part between ``in_proj`` and ``out_proj`` runs fused
(:func:`paperlib.models.scan.mamba_inner_cpu`: the same computation without transposed copies,
about 1.75x faster for forward + backward); ``fuse_cpu = False`` keeps the step-by-step path.

Parameters (d = d_model, E = d_inner = expand · d, R = dt_rank = ceil(d / 16), N = d_state,
K = d_conv)::

    in_proj.weight   (2E, d)        no bias
    conv1d.weight    (E, 1, K)      depthwise, causal; conv1d.bias (E,)
    x_proj.weight    (R + 2N, E)    no bias
    dt_proj.weight   (E, R)         dt_proj.bias (E,): inverse softplus of dt ~ logU(dt_min, dt_max)
    A_log            (E, N)         log(1..N) in every channel (S4D-real); A = -exp(A_log)
    D                (E,)           ones
    out_proj.weight  (d, E)         no bias
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from paperlib.models.scan import mamba_inner_cpu, resolve_backend, selective_scan


class MambaState(NamedTuple):
    """Constant-size recurrent state of one block for streaming inference.

    conv: (batch, E, K) the last K inputs of the convolution (oldest first).
    ssm: (batch, E, N) the SSM state h.
    """

    conv: torch.Tensor
    ssm: torch.Tensor


class MambaBlock(nn.Module):
    """Mamba block (``mamba_ssm.Mamba``'s non-fused path): (batch, L, d) → (batch, L, d).

    Args:
        d_model: model width d.
        d_state: SSM state size N (mamba_ssm's default is 16; Mamba4Rec passes 32).
        d_conv: causal convolution width K.
        expand: E = expand · d.
        dt_rank: rank R of the Δ projection; "auto" = ceil(d / 16).
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: mamba_ssm's Δ initialisation.
        conv_bias, bias: biases of the convolution and of in_proj/out_proj (mamba_ssm defaults).
        scan_backend: "auto", "reference", "cpu" or "cuda" (see :func:`selective_scan`).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        # Δ projection: weights keep the variance of dt at init; bias = softplus⁻¹(dt) with dt
        # log-uniform in [dt_min, dt_max]
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)

        # S4D-real initialisation: A = -(1..N) in every channel
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    #: on CPU with the "cpu" scan backend, run the part between in_proj and out_proj as one fused
    #: channels-last function (:func:`paperlib.models.scan.mamba_inner_cpu`); False runs the
    #: step-by-step path below (the same computation, kept for comparison)
    fuse_cpu: bool = True

    def _use_fused(self, hidden: torch.Tensor) -> bool:
        dtype = hidden.dtype
        return (self.fuse_cpu and hidden.device.type == "cpu" and dtype in (torch.float32, torch.float64)
                and resolve_backend(self.scan_backend, hidden) == "cpu"
                and all(p.dtype == dtype for p in self.parameters()))

    # ------------------------------------------------------------------------------------------
    def forward(
        self, hidden: torch.Tensor, return_state: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, MambaState]:
        """hidden (batch, L, d) → (batch, L, d); causal in L.

        With ``return_state`` also the :class:`MambaState` after the last position, from which
        :meth:`step` continues (every row is taken to be L items long: no right padding).
        """
        if self._use_fused(hidden):
            return self._forward_fused(hidden, return_state)
        batch, length, _ = hidden.shape
        xz = self.in_proj(hidden).transpose(1, 2)  # (batch, 2E, L)
        x, z = xz.chunk(2, dim=1)  # (batch, E, L) each
        # causal depthwise convolution: pad K-1 on both sides, keep the first L outputs
        x_conv_in = x
        x = F.silu(self.conv1d(x)[..., :length])  # (batch, E, L)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj.weight @ dt.transpose(1, 2)  # (E, R) @ (batch, R, L) → (batch, E, L); bias in the scan
        A = -torch.exp(self.A_log.float())  # (E, N)
        out = selective_scan(
            x,
            dt,
            A,
            B.transpose(1, 2),  # (batch, N, L)
            C.transpose(1, 2),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            return_last_state=return_state,
            backend=self.scan_backend,
        )
        if return_state:
            y, ssm = out
            conv = F.pad(x_conv_in, (max(0, self.d_conv - length), 0))[..., -self.d_conv :]
            return self.out_proj(y.transpose(1, 2)), MambaState(conv=conv.detach().clone(), ssm=ssm.detach().clone())
        return self.out_proj(out.transpose(1, 2))

    def _forward_fused(self, hidden: torch.Tensor, return_state: bool):
        """``forward`` through :func:`mamba_inner_cpu`: (batch, L, d) throughout, no transposes."""
        length = hidden.shape[1]
        xz = self.in_proj(hidden)  # (batch, L, 2E)
        # A, D and the Δ bias in float32, as the step-by-step path passes them to the scan
        as_scan = lambda t: t.float().to(hidden.dtype)  # noqa: E731
        A = as_scan(-torch.exp(self.A_log.float()))  # (E, N)
        y, ssm = mamba_inner_cpu(xz, self.conv1d.weight[:, 0, :], self.conv1d.bias, self.x_proj.weight,
                                 self.dt_proj.weight, as_scan(self.dt_proj.bias), A, as_scan(self.D))
        out = self.out_proj(y)
        if not return_state:
            return out
        x = xz[..., : self.d_inner].transpose(1, 2)  # the convolution's input (batch, E, L)
        conv = F.pad(x, (max(0, self.d_conv - length), 0))[..., -self.d_conv :]
        return out, MambaState(conv=conv.detach().clone(), ssm=ssm.detach().clone())

    # ------------------------------------------------------------------------------------------
    def allocate_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MambaState:
        """Zero state before the first item: conv (batch, E, K), ssm (batch, E, N)."""
        device = device if device is not None else self.in_proj.weight.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        return MambaState(
            conv=torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.promote_types(dtype, torch.float32)),
        )

    def step(self, hidden: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One time step: hidden (batch, d) and the state before it → output (batch, d) and the
        state after it (new tensors: the input state is left unchanged). Constant cost per item."""
        xz = self.in_proj(hidden)  # (batch, 2E)
        x, z = xz.chunk(2, dim=-1)  # (batch, E)
        conv = torch.cat([state.conv[:, :, 1:], x[:, :, None]], dim=2)  # (batch, E, K)
        x = (conv * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        x_dbl = self.x_proj(x)  # (batch, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight) + self.dt_proj.bias)  # (batch, E)
        A = -torch.exp(self.A_log.float())  # (E, N)
        dt32 = dt.to(state.ssm.dtype)
        ssm = torch.exp(dt32[:, :, None] * A) * state.ssm + (dt32 * x.to(dt32.dtype))[:, :, None] * B.to(dt32.dtype)[:, None, :]
        y = (ssm * C.to(dt32.dtype)[:, None, :]).sum(-1).to(x.dtype)  # (batch, E)
        y = (y + self.D.to(x.dtype) * x) * F.silu(z)
        return self.out_proj(y), MambaState(conv=conv, ssm=ssm)
