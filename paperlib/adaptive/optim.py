"""Step-size rules as ``torch.optim`` optimizers: AdaGrad-Norm (AdaBatchGrad's step) and USGM.

Both treat all parameters, across all parameter groups, as one vector x (one global step size;
USGM's ball is over the whole vector). Their scalar state (accumulated squared norms, the
curvature estimate H, counters) lives under the ``"global"`` key of ``state_dict()``, as plain
Python floats, ints, bools and strings; per-parameter state holds tensors only. A
``state_dict()`` therefore round-trips through ``torch.save`` / ``torch.load(weights_only=True)``,
and a run resumed from it continues bit-exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.optim.optimizer import Optimizer, ParamsT


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _sum_f64(values: list[torch.Tensor]) -> torch.Tensor:
    """Sum 0-dim float64 tensors (on the parameters' device) into one; zero for an empty list."""
    return torch.stack(values).sum() if values else torch.zeros((), dtype=torch.float64)


def _check_finite(value: float, what: str, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{what} is {value} at step {step}: the gradient holds NaN or inf. Check the loss "
            "(e.g. lower the step scale or clip the inputs); the optimizer state was left unchanged."
        )


class _GlobalStateOptimizer(Optimizer):
    """An optimizer with one dict of scalar state shared by all parameters (``self._global``)."""

    _global: dict[str, Any]

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """Torch's ``state_dict()`` plus ``"global"``: the shared scalar state (plain values)."""
        state = super().state_dict()
        state["global"] = dict(self._global)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` of the same optimizer class."""
        if "global" not in state_dict:
            raise ValueError(f"not a {type(self).__name__} state dict: it has no 'global' entry "
                             f"(keys: {sorted(state_dict)})")
        state_dict = dict(state_dict)
        saved = dict(state_dict.pop("global"))
        if set(saved) != set(self._global):
            raise ValueError(f"not a {type(self).__name__} state dict: its global state has keys "
                             f"{sorted(saved)}, expected {sorted(self._global)}")
        super().load_state_dict(state_dict)
        self._global = saved


class AdaGradNorm(_GlobalStateOptimizer):
    """AdaGrad-Norm: SGD with one global scalar step, the step of AdaBatchGrad.

    AdaBatchGrad (Ostroukhov, Zhumabayeva, Xiang, Gasnikov, Takáč, Kamzolov 2024,
    arXiv:2402.05264) combines adaptive batch sizes (Byrd et al. 2012; Bollapragada, Byrd,
    Nocedal 2018) with the step

        h_k = alpha / sqrt(beta + sum_{j<k} ||g_j||^2),      x_{k+1} = x_k - h_k g_k,

    where g_j is the mini-batch gradient of step j over *all* parameters together.

    Indexing: by default the sum runs over the **previous** gradients j < k, as AdaBatchGrad
    writes it. h_k is then fixed before the mini-batch of step k is drawn, so it is independent
    of g_k given the past and E[h_k g_k | past] = h_k grad f(x_k): the property the stochastic
    analyses of this "delayed" AdaGrad step use (Li and Orabona 2019, "On the convergence of
    stochastic gradient descent with adaptive stepsizes"). The first step is
    ``alpha / sqrt(beta)``. ``include_current=True`` gives the classical AdaGrad-Norm of Ward, Wu,
    Bottou (2019), ``h_k = alpha / sqrt(beta + sum_{j<=k} ||g_j||^2)``, whose first step is
    already damped by ||g_0||.

    ``alpha`` and ``beta`` may differ between parameter groups (the accumulated sum is shared);
    :attr:`last_step_size` reports the step of the first group.

    Args:
        params: parameters or parameter groups.
        alpha: step scale, > 0 (AdaBatchGrad: 1).
        beta: initial value of the accumulator, > 0 (AdaBatchGrad: 1).
        include_current: add ||g_k||^2 to the sum before computing h_k (see above).
    """

    def __init__(self, params: ParamsT, alpha: float = 1.0, beta: float = 1.0, *,
                 include_current: bool = False) -> None:
        _positive("alpha", alpha)
        _positive("beta", beta)
        super().__init__(params, dict(alpha=float(alpha), beta=float(beta), include_current=bool(include_current)))
        self._global = {"step": 0, "sum_sq": 0.0, "last_step_size": float("nan")}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("alpha", "beta"):
            _positive(f"{key} (parameter group {len(self.param_groups)})", param_group.get(key, self.defaults[key]))
        super().add_param_group(param_group)

    @property
    def last_step_size(self) -> float:
        """h_k of the last step (first parameter group); NaN before the first step."""
        return self._global["last_step_size"]

    @property
    def sum_sq(self) -> float:
        """The accumulated sum of squared gradient norms (the gradients used so far)."""
        return self._global["sum_sq"]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One step ``x <- x - h_k p.grad``; ``closure`` (optional) recomputes loss and gradients
        first, as in torch's optimizers. Parameters without a gradient are left unchanged."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for p in self._params() if p.grad is not None]
        if not grads:
            return loss
        if any(g.is_sparse for g in grads):
            raise RuntimeError("AdaGradNorm does not support sparse gradients")
        g2 = float(_sum_f64([torch.linalg.vector_norm(g, dtype=torch.float64).square() for g in grads]))
        _check_finite(g2, "the squared gradient norm", self._global["step"])
        previous = self._global["sum_sq"]
        total = previous + g2
        for i, group in enumerate(self.param_groups):
            seen = total if group["include_current"] else previous
            h = group["alpha"] / math.sqrt(group["beta"] + seen)
            if i == 0:
                self._global["last_step_size"] = h
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-h)
        self._global["sum_sq"] = total
        self._global["step"] += 1
        return loss


class USGM(_GlobalStateOptimizer):
    """Universal Stochastic Gradient Method (Rodomanov, Kavis, Wu, Antonakopoulos, Cevher 2024,
    "Universal gradient methods for stochastic convex optimization", arXiv:2402.03210,
    Algorithm 4.1), on the ball B(x_0, D) around the starting point.

    With g_k the stochastic gradient at x_k, H_0 = 0 and radius D:

        x_1     = x_0 - D g_0 / ||g_0||                        (the minimiser of <g_0, x> on the ball)
        x_{k+1} = Proj_{B(x_0, D)}(x_k - g_k / H_k)              (k >= 1)
        r = ||x_{k+1} - x_k||,  beta = <g_{k+1} - g_k, x_{k+1} - x_k>,
        H_{k+1} = H_k + max(0, beta - H_k r^2 / 2) / (D^2 + r^2 / 2),

    where g_{k+1} is the stochastic gradient at the new point x_{k+1}, the one the next step
    uses. The projection is of ``x_k - g_k / H_k`` (the gradient step from the current iterate),
    never from the averaged point.

    Two ways to call it, the same algorithm:

    * ``step()`` once per mini-batch, with ``p.grad`` = g_k at the current point x_k (the usual
      training loop). The H update of the previous move needs g_k, so it is done at the start of
      this call, *before* the move; the sequence of H, x and averages is exactly the one above.
    * ``step(closure)``: the move is made with ``p.grad`` (if no parameter has a gradient yet,
      the closure is called first to get one at x_k); then the closure is called at x_{k+1} and
      the H update is done inside this call. The closure must zero the gradients and recompute
      loss and gradients at the current parameters. Do not recompute gradients between two
      ``step(closure)`` calls: the next call moves with the gradient the closure left in
      ``p.grad``, as the algorithm uses g_{k+1} both for H_{k+1} and for the move from x_{k+1}.
      Returns the loss the closure returned at the new point.

    Rules for the cases Algorithm 4.1 leaves implicit:

    * **H_k = 0 after the first step** (no positive curvature seen yet, e.g. beta <= 0): the
      step ``x_k - g_k / H_k`` is infinitely long, and the prox step with H = 0 is the minimiser
      of the linear model on the ball, ``x_{k+1} = x_0 - D g_k / ||g_k||`` -- the same rule as
      the first step, and the limit of ``Proj(x_k - g_k / H)`` as H -> 0+.
    * **zero gradient while H_k = 0** (e.g. at the start): there is no direction, so the step is
      skipped: the parameters do not move, no iterate is added to the average, and
      :attr:`last_skip_reason` says why (:attr:`last_step_size` is 0). The next call tries again
      from the same point. With H_k > 0 a zero gradient is an ordinary step of length zero.
    * Parameters without a gradient count as having a zero gradient.

    Averaging: the guarantee of Algorithm 4.1 (convex problems) is for the uniform average of
    the iterates, not the last one. We average the points the steps produce, x_1..x_k, and leave
    out x_0: the analysis bounds f at each point x_{i+1} reached by a step from x_i (beta is the
    linearisation error there), and x_0 is only where the method starts (the first step jumps to
    the boundary of the ball whatever g_0 is). :meth:`averaged` swaps that average into the
    parameters for evaluation (before any step it is x_0).

    x_0 is the value of the parameters at the first call of :meth:`step`. Memory: four copies of
    the parameters (x_0, the average, the last move, the last gradient).

    Args:
        params: parameters or parameter groups (all groups share the radius: one ball).
        radius: D > 0, the radius of the ball B(x_0, D) the iterates stay in. It should be at
            least the distance from x_0 to a solution.
    """

    def __init__(self, params: ParamsT, radius: float) -> None:
        _positive("radius", radius)
        super().__init__(params, dict(radius=float(radius)))
        self._global = {
            "iteration": 0,  # k: moves made (iterates x_1..x_k produced)
            "H": 0.0,
            "pending": False,  # a move was made whose H update waits for the gradient at its end
            "last_step_size": float("nan"),
            "last_skip_reason": None,
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        radius = _positive("radius", param_group.get("radius", self.defaults["radius"]))
        if radius != self.defaults["radius"]:
            raise ValueError(f"USGM uses one ball over all parameters: every group needs radius "
                             f"{self.defaults['radius']}, got {radius}")
        super().add_param_group(param_group)

    @property
    def radius(self) -> float:
        return self.defaults["radius"]

    @property
    def H(self) -> float:
        """The current curvature estimate H_k (0 before the first H update)."""
        return self._global["H"]

    @property
    def iteration(self) -> int:
        """k: the number of moves made so far."""
        return self._global["iteration"]

    @property
    def last_step_size(self) -> float:
        """1/H_k of the last move, or D/||g_k|| for a move with H_k = 0 (the first one); 0 for a
        skipped step; NaN before the first step."""
        return self._global["last_step_size"]

    @property
    def last_skip_reason(self) -> str | None:
        """Why the last call made no move (zero gradient with H = 0), else None."""
        return self._global["last_skip_reason"]

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params()]

    def _init_state(self) -> None:
        for p in self._params():
            st = self.state[p]
            if not st:
                st["x0"] = p.detach().clone()
                st["avg"] = p.detach().clone()
                st["delta"] = torch.zeros_like(p)
                st["prev_grad"] = torch.zeros_like(p)

    def _update_H(self, grads: list[torch.Tensor]) -> None:
        """H_{k+1} from the last move x_{k+1} - x_k and the gradient g_{k+1} at x_{k+1}."""
        r2_parts, beta_parts = [], []
        for p, g in zip(self._params(), grads):
            st = self.state[p]
            r2_parts.append(torch.linalg.vector_norm(st["delta"], dtype=torch.float64).square())
            beta_parts.append(((g - st["prev_grad"]) * st["delta"]).sum(dtype=torch.float64))
        r2, beta = torch.stack([_sum_f64(r2_parts), _sum_f64(beta_parts)]).tolist()
        _check_finite(beta, "<g_{k+1} - g_k, x_{k+1} - x_k>", self._global["iteration"])
        H, D = self._global["H"], self.radius
        self._global["H"] = H + max(0.0, beta - H * r2 / 2) / (D * D + r2 / 2)
        self._global["pending"] = False

    def _move(self, grads: list[torch.Tensor]) -> None:
        """x_{k+1} from x_k and g_k (or a recorded skip), then the running average."""
        params, D, H = self._params(), self.radius, self._global["H"]
        g2 = float(_sum_f64([torch.linalg.vector_norm(g, dtype=torch.float64).square() for g in grads]))
        _check_finite(g2, "the squared gradient norm", self._global["iteration"])
        if H == 0.0 and g2 == 0.0:
            self._global["last_step_size"] = 0.0
            self._global["last_skip_reason"] = (
                f"zero gradient with H = 0 at iteration {self._global['iteration']}: no direction "
                "to move in, parameters left unchanged")
            return
        for p, g in zip(params, grads):
            st = self.state[p]
            st["delta"].copy_(p)  # x_k for now; becomes x_{k+1} - x_k below
            st["prev_grad"].copy_(g)
        if H == 0.0:
            # minimiser of <g_k, x> on B(x_0, D): the first step, and every step while H = 0
            step = D / math.sqrt(g2)
            for p, g in zip(params, grads):
                p.copy_(self.state[p]["x0"]).add_(g, alpha=-step)
        else:
            step = 1.0 / H
            for p, g in zip(params, grads):
                p.add_(g, alpha=-step)
            dist = math.sqrt(float(_sum_f64(
                [torch.linalg.vector_norm(p - self.state[p]["x0"], dtype=torch.float64).square() for p in params])))
            if dist > D:  # project back onto the ball: x_0 + (y - x_0) D / ||y - x_0||
                for p in params:
                    x0 = self.state[p]["x0"]
                    p.sub_(x0).mul_(D / dist).add_(x0)
        k = self._global["iteration"] + 1
        for p in params:
            st = self.state[p]
            st["delta"].neg_().add_(p)
            # uniform average of x_1..x_k: avg += (x_k - avg)/k; at k = 1 it becomes x_1 exactly
            st["avg"].lerp_(p, 1.0 / k)
        self._global.update(iteration=k, pending=True, last_step_size=step, last_skip_reason=None)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One iteration of Algorithm 4.1 (see the class docstring for the two calling modes)."""
        params = self._params()
        if closure is not None and all(p.grad is None for p in params):
            with torch.enable_grad():
                closure()
        if any(p.grad is not None and p.grad.is_sparse for p in params):
            raise RuntimeError("USGM does not support sparse gradients")
        self._init_state()
        grads = self._grads()
        if self._global["pending"]:
            self._update_H(grads)  # g_k closes the H update of the move into x_k
        self._move(grads)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if self._global["pending"]:
                self._update_H(self._grads())
        return loss

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Temporarily put the average of the iterates x_1..x_k into the parameters.

        ``with opt.averaged(): evaluate(model)`` evaluates the point USGM's guarantee is for; the
        current iterate x_k is restored on exit (also on an exception). Before the first move the
        average is x_0, i.e. the parameters are unchanged.
        """
        params = [p for p in self._params() if "avg" in self.state[p]]
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            for p in params:
                p.copy_(self.state[p]["avg"])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
