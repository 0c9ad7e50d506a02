"""Tests of the adaptive batch-size and step-size library: optimizers on problems with known
optima and hand-computed steps, batch-size statistics against hand-computed values and plain
numpy loops, the batch-size schedule, gradient matrices, exact resume and bad input."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from paperlib.adaptive import (
    USGM,
    AdaGradNorm,
    BatchSizeConfig,
    BatchSizeController,
    augmented_test,
    group_gradients,
    inner_product_test,
    norm_test,
    orthogonality_test,
    per_example_gradients,
    run_test,
    set_flat_grad,
    split_batch,
)

F64 = torch.float64


def roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint goes."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- problems with known optima ------------------------------------------------------------------

QUAD_A = torch.diag(torch.tensor([1.0, 10.0, 0.5], dtype=F64))
QUAD_B = torch.tensor([1.0, -2.0, 0.5], dtype=F64)


def quad(x: torch.Tensor) -> torch.Tensor:
    """f(x) = x'Ax/2 - b'x; minimiser A^{-1} b = (1, -0.2, 1), f* = -b'A^{-1}b/2 = -0.825."""
    return 0.5 * x @ QUAD_A @ x - QUAD_B @ x


QUAD_FSTAR = -0.825


class LogReg:
    """Fixed synthetic L2-regularised logistic regression; its optimum is found by Newton's method
    in numpy (independent of torch and of the optimizers under test)."""

    n, d, lam = 200, 5, 0.01

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.X = torch.randn(self.n, self.d, generator=g, dtype=F64)
        w_true = torch.tensor([1.5, -2.0, 0.5, 0.0, 1.0], dtype=F64)
        self.y = (torch.rand(self.n, generator=g, dtype=F64) < torch.sigmoid(self.X @ w_true)).to(F64)
        X, y, w = self.X.numpy(), self.y.numpy(), np.zeros(self.d)
        for _ in range(30):
            p = 1 / (1 + np.exp(-X @ w))
            grad = X.T @ (p - y) / self.n + self.lam * w
            hess = (X.T * (p * (1 - p))) @ X / self.n + self.lam * np.eye(self.d)
            w = w - np.linalg.solve(hess, grad)
        assert np.linalg.norm(grad) < 1e-12
        self.w_star = torch.tensor(w)
        self.f_star = float(self.loss(self.w_star))

    def loss(self, w: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        return nn.functional.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * self.lam * (w @ w)

    def batches(self, steps: int, size: int = 10, seed: int = 1) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, self.n, (size,), generator=g) for _ in range(steps)]


@pytest.fixture(scope="module")
def logreg() -> LogReg:
    return LogReg()


def run(opt_factory, loss_of, steps: int, x0: torch.Tensor, after_step=None):
    """Minimise with one optimizer step per mini-batch; returns (x, optimizer)."""
    x = x0.clone().requires_grad_(True)
    opt = opt_factory([x])
    for k in range(steps):
        opt.zero_grad()
        loss_of(x, k).backward()
        opt.step()
        if after_step is not None:
            after_step(x, opt)
    return x, opt


# --- AdaGrad-Norm --------------------------------------------------------------------------------

def test_adagrad_norm_steps_by_hand():
    # f = ||x||^2 / 2, so g = x. x0 = (3, 4), alpha = 0.5, beta = 1.
    # default (sum over j < k): h0 = 0.5/sqrt(1) -> x1 = (1.5, 2); h1 = 0.5/sqrt(1 + 25) -> x2 = x1 (1 - h1)
    x, opt = run(lambda p: AdaGradNorm(p, alpha=0.5), lambda x, k: 0.5 * x @ x, 1, torch.tensor([3.0, 4.0], dtype=F64))
    assert x.tolist() == [1.5, 2.0] and opt.last_step_size == 0.5 and opt.sum_sq == 25.0
    opt.zero_grad()
    (0.5 * x @ x).backward()
    opt.step()
    h1 = 0.5 / math.sqrt(26.0)
    assert opt.last_step_size == pytest.approx(h1, rel=1e-15)
    assert x.tolist() == pytest.approx([1.5 * (1 - h1), 2 * (1 - h1)], rel=1e-15)
    assert opt.sum_sq == pytest.approx(25 + 6.25, rel=1e-15)
    # include_current=True: h0 = 0.5/sqrt(1 + 25) already uses g0
    x, opt = run(lambda p: AdaGradNorm(p, alpha=0.5, include_current=True), lambda x, k: 0.5 * x @ x, 1,
                 torch.tensor([3.0, 4.0], dtype=F64))
    assert opt.last_step_size == pytest.approx(h1, rel=1e-15)
    assert x.tolist() == pytest.approx([3 * (1 - h1), 4 * (1 - h1)], rel=1e-15)


def test_adagrad_norm_is_one_global_step_over_all_parameters():
    a = torch.tensor([3.0], dtype=F64, requires_grad=True)
    b = torch.tensor([4.0], dtype=F64, requires_grad=True)
    opt = AdaGradNorm([{"params": [a]}, {"params": [b], "alpha": 2.0}], alpha=1.0)
    for _ in range(2):
        opt.zero_grad()
        (0.5 * (a**2 + b**2)).sum().backward()
        opt.step()
    # step 0: h = 1 and 2 -> a = 0, b = -4; the sum is ||(3, 4)||^2 = 25 for both groups
    # step 1: g = (0, -4), h = 1/sqrt(26) and 2/sqrt(26)
    assert a.item() == 0.0
    assert b.item() == pytest.approx(-4 + 8 / math.sqrt(26), rel=1e-15)
    assert opt.sum_sq == 41.0


def test_adagrad_norm_converges_on_quadratic():
    x, _ = run(AdaGradNorm, lambda x, k: quad(x), 2000, torch.zeros(3, dtype=F64))
    assert float(quad(x.detach())) - QUAD_FSTAR < 1e-3


def test_adagrad_norm_converges_on_logistic_regression(logreg):
    batches = logreg.batches(3000)
    x, _ = run(AdaGradNorm, lambda x, k: logreg.loss(x, batches[k]), 3000, torch.zeros(logreg.d, dtype=F64))
    assert float(logreg.loss(x.detach())) - logreg.f_star < 1e-2  # the last iterate, with mini-batch noise


# --- USGM ----------------------------------------------------------------------------------------

def test_usgm_steps_by_hand():
    # f = ||x||^2 / 2 (g = x), x0 = (3, 4), D = 10.
    x = torch.tensor([3.0, 4.0], dtype=F64, requires_grad=True)
    opt = USGM([x], radius=10.0)

    def grad_step():
        opt.zero_grad()
        (0.5 * x @ x).backward()
        opt.step()

    grad_step()  # x1 = x0 - D g0/||g0|| = (3, 4) - 10 (0.6, 0.8)
    assert x.tolist() == [-3.0, -4.0] and opt.H == 0.0 and opt.last_step_size == 2.0  # D/||g0||
    grad_step()  # H1 = max(0, beta)/(D^2 + r^2/2) with r = 10, beta = <(-6,-8), (-6,-8)> = 100
    assert opt.H == pytest.approx(100 / 150, rel=1e-15)
    assert opt.last_step_size == pytest.approx(1.5, rel=1e-15)
    assert x.tolist() == pytest.approx([1.5, 2.0], rel=1e-15)  # x1 - 1.5 x1, inside the ball (2.5 from x0)
    with opt.averaged():
        assert x.tolist() == pytest.approx([-0.75, -1.0], rel=1e-15)  # (x1 + x2)/2, x0 not included
    assert x.tolist() == pytest.approx([1.5, 2.0], rel=1e-15)
    grad_step()  # r = ||(4.5, 6)|| = 7.5, beta = 56.25: H2 = 2/3 + (56.25 - (2/3) 56.25/2)/(100 + 28.125)
    H2 = 2 / 3 + 37.5 / 128.125
    assert opt.H == pytest.approx(H2, rel=1e-14)
    assert x.tolist() == pytest.approx([1.5 * (1 - 1 / H2), 2.0 * (1 - 1 / H2)], rel=1e-14)
    assert opt.iteration == 3


def test_usgm_projects_onto_the_ball():
    # f = ||x||^2/2, x0 = (3, 4), D = 1: the minimiser on the ball is (2.4, 3.2) = x1.
    # x2 = Proj(x1 - x1/H1) with H1 = 1/(1 + 1/2) lands back on x1; then r = 0 and H stays.
    x = torch.tensor([3.0, 4.0], dtype=F64, requires_grad=True)
    opt = USGM([x], radius=1.0)
    for k in range(5):
        opt.zero_grad()
        (0.5 * x @ x).backward()
        opt.step()
        assert x.tolist() == pytest.approx([2.4, 3.2], rel=1e-14)
    assert opt.H == pytest.approx(2 / 3, rel=1e-14)


def test_usgm_zero_curvature_rule_and_zero_gradient():
    # linear f = <c, x>: beta = 0, H stays 0, every step is the minimiser of f on the ball
    c = torch.tensor([1.0, -2.0, 2.0], dtype=F64)
    x, opt = run(lambda p: USGM(p, radius=3.0), lambda x, k: c @ x, 4, torch.ones(3, dtype=F64))
    assert opt.H == 0.0 and opt.iteration == 4 and opt.last_skip_reason is None
    assert x.tolist() == pytest.approx((torch.ones(3, dtype=F64) - 3.0 * c / 3.0).tolist(), rel=1e-15)
    assert opt.last_step_size == 1.0  # D/||c|| = 3/3
    # zero gradient at the start: skipped with a reason, nothing moves, no NaN
    x0 = torch.tensor([1.0, 2.0], dtype=F64)
    x, opt = run(lambda p: USGM(p, radius=1.0), lambda x, k: 0.5 * ((x - x0) ** 2).sum(), 2, x0)
    assert torch.equal(x.detach(), x0) and opt.iteration == 0 and opt.H == 0.0
    assert "zero gradient" in opt.last_skip_reason and opt.last_step_size == 0.0
    with opt.averaged():
        assert torch.equal(x.detach(), x0)


def test_usgm_converges_on_quadratic_and_stays_in_ball():
    D, x0 = 30.0, torch.zeros(3, dtype=F64)

    def inside(x, opt):
        assert float(torch.linalg.norm(x.detach() - x0)) <= D * (1 + 1e-12)

    x, opt = run(lambda p: USGM(p, radius=D), lambda x, k: quad(x), 2000, x0, inside)
    with opt.averaged():
        gap_avg = float(quad(x.detach())) - QUAD_FSTAR
    assert gap_avg < 5e-3  # the guarantee is O(L D^2 / k) for the average
    assert float(quad(x.detach())) - QUAD_FSTAR < 1e-8  # on a noiseless problem x_k converges too


def test_usgm_converges_on_logistic_regression(logreg):
    D, x0 = 5.0, torch.zeros(logreg.d, dtype=F64)
    assert float(torch.linalg.norm(logreg.w_star)) < D  # the optimum is inside the ball
    batches = logreg.batches(3000)
    distances = []
    x, opt = run(lambda p: USGM(p, radius=D), lambda x, k: logreg.loss(x, batches[k]), 3000, x0,
                 lambda x, opt: distances.append(float(torch.linalg.norm(x.detach() - x0))))
    assert max(distances) <= D * (1 + 1e-12) and max(distances) == pytest.approx(D)  # the ball is hit, never left
    gap_last = float(logreg.loss(x.detach())) - logreg.f_star
    with opt.averaged():
        gap_avg = float(logreg.loss(x.detach())) - logreg.f_star
        dist_avg = float(torch.linalg.norm(x.detach() - logreg.w_star))
    assert gap_avg < 2e-3 and dist_avg < 0.1
    assert gap_avg < gap_last / 5  # with noise the average, not the last iterate, is what converges


def test_usgm_closure_mode_is_the_same_algorithm(logreg):
    batches = logreg.batches(60)
    lazy, lazy_opt = run(lambda p: USGM(p, radius=5.0), lambda x, k: logreg.loss(x, batches[k]), 60,
                         torch.zeros(logreg.d, dtype=F64))
    x = torch.zeros(logreg.d, dtype=F64, requires_grad=True)
    opt = USGM([x], radius=5.0)
    calls = []

    def closure():  # gradient at the current point on the next mini-batch
        opt.zero_grad()
        loss = logreg.loss(x, batches[len(calls)])
        loss.backward()
        calls.append(loss.item())
        return loss

    for _ in range(59):
        returned = opt.step(closure)
        assert returned.item() == calls[-1]
    assert len(calls) == 60  # one extra evaluation at x_0 on the first call
    assert opt.H > 0 and not opt._global["pending"]  # H updated inside each step
    opt.step()  # the 60th move uses the gradient the last closure left in p.grad
    assert torch.equal(x.detach(), lazy.detach())
    assert opt.iteration == lazy_opt.iteration == 60
    assert opt.H == lazy_opt.H  # both hold H_59 and wait for the gradient at x_60
    with opt.averaged(), lazy_opt.averaged():
        assert torch.equal(x.detach(), lazy.detach())


def test_usgm_averaged_restores_parameters_on_error():
    x, opt = run(lambda p: USGM(p, radius=2.0), lambda x, k: quad(x), 5, torch.zeros(3, dtype=F64))
    current = x.detach().clone()
    with pytest.raises(RuntimeError, match="inside"):
        with opt.averaged():
            assert not torch.equal(x.detach(), current)
            raise RuntimeError("inside")
    assert torch.equal(x.detach(), current)


# --- exact resume --------------------------------------------------------------------------------

def _train(opt_cls, kwargs, steps: int, state=None, start: int = 0, model=None):
    """A float32 linear model on a fixed stream of mini-batches (mini-batch k depends on k only)."""
    if model is None:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
    opt = opt_cls(model.parameters(), **kwargs)
    if state is not None:
        opt.load_state_dict(state)
    X = torch.randn(64, 4, generator=torch.Generator().manual_seed(5))
    Y = X @ torch.randn(4, 2, generator=torch.Generator().manual_seed(6))
    for k in range(start, steps):
        idx = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(100 + k))
        opt.zero_grad()
        nn.functional.mse_loss(model(X[idx]), Y[idx]).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("opt_cls,kwargs", [(AdaGradNorm, {"alpha": 0.5}), (USGM, {"radius": 3.0})])
def test_optimizer_resume_is_bit_exact(opt_cls, kwargs):
    full, full_opt = _train(opt_cls, kwargs, 30)
    part, part_opt = _train(opt_cls, kwargs, 12)
    saved = roundtrip({"model": part.state_dict(), "opt": part_opt.state_dict()})
    resumed = nn.Linear(4, 2)
    resumed.load_state_dict(saved["model"])
    resumed, resumed_opt = _train(opt_cls, kwargs, 30, state=saved["opt"], start=12, model=resumed)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert resumed_opt.state_dict()["global"] == full_opt.state_dict()["global"]
    if opt_cls is USGM:
        with full_opt.averaged(), resumed_opt.averaged():
            for a, b in zip(full.parameters(), resumed.parameters()):
                assert torch.equal(a, b)
        for p in resumed.parameters():
            assert all(t.dtype == torch.float32 for t in resumed_opt.state[p].values())


def test_load_state_dict_of_another_optimizer_fails():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="no 'global' entry"):
        USGM(model.parameters(), radius=1.0).load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    with pytest.raises(ValueError, match="not a USGM state dict"):
        USGM(model.parameters(), radius=1.0).load_state_dict(AdaGradNorm(model.parameters()).state_dict())


# --- optimizer bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_optimizer_arguments_must_be_positive_finite(bad):
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        AdaGradNorm(p, alpha=bad)
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        AdaGradNorm(p, beta=bad)
    with pytest.raises(ValueError, match="radius must be a positive finite number"):
        USGM(p, radius=bad)
    with pytest.raises(ValueError, match=r"alpha \(parameter group 1\)"):
        AdaGradNorm([{"params": p}, {"params": [torch.zeros(1, requires_grad=True)], "alpha": bad}])


def test_usgm_groups_share_one_ball_and_nan_gradients_are_refused():
    with pytest.raises(ValueError, match="one ball"):
        USGM([{"params": [torch.zeros(1, requires_grad=True)]},
              {"params": [torch.zeros(1, requires_grad=True)], "radius": 2.0}], radius=1.0)
    for opt_cls, kw in [(USGM, {"radius": 1.0}), (AdaGradNorm, {})]:
        x = torch.ones(2, requires_grad=True)
        opt = opt_cls([x], **kw)
        x.grad = torch.tensor([1.0, float("nan")])
        with pytest.raises(FloatingPointError, match="NaN or inf"):
            opt.step()
        assert torch.equal(x.detach(), torch.ones(2))


# --- batch-size tests: hand-computed values ------------------------------------------------------

# three per-example gradients; g = (1, 1), ||g||^2 = 2
G3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])


def test_norm_test_by_hand():
    # g_i - g = (0,-1), (-1,0), (1,1): squared norms 1, 1, 2 -> Var = 4/2 = 2; Var/b = 2/3
    r = norm_test(G3, 3, theta=0.5)  # threshold 0.25 * 2 = 0.5 -> fails, b_new = ceil(2/0.5) = 4
    assert (r.statistic, r.threshold, r.passed, r.proposed_batch_size) == (pytest.approx(2 / 3), 0.5, False, 4)
    r = norm_test(G3, 3, theta=0.9)  # threshold 1.62 -> passes, keeps b
    assert (r.passed, r.proposed_batch_size, r.skipped) == (True, 3, None)


def test_inner_product_test_by_hand():
    # <g_i, g> = 1, 1, 4; minus ||g||^2 = 2: -1, -1, 2 -> Var_ip = (1 + 1 + 4)/2 = 3; Var_ip/b = 1
    r = inner_product_test(G3, 3, theta=0.5)  # threshold 0.25 * 4 = 1: passes on the boundary
    assert (r.statistic, r.threshold, r.passed, r.proposed_batch_size) == (1.0, 1.0, True, 3)
    r = inner_product_test(G3, 3, theta=0.4)  # threshold 0.64 -> b_new = ceil(3/0.64) = ceil(4.6875) = 5
    assert (r.threshold, r.passed, r.proposed_batch_size) == (pytest.approx(0.64), False, 5)


def test_orthogonality_test_by_hand():
    # projections on g: 0.5 g, 0.5 g, 2 g; orthogonal parts (0.5,-0.5), (-0.5,0.5), 0 -> 0.5, 0.5, 0
    # Var_perp = 1/2, Var_perp/b = 1/6; nu = 0.25: threshold 0.0625 * 2 = 0.125 -> ceil(0.5/0.125) = 4
    r = orthogonality_test(G3, 3, nu=0.25)
    assert (r.statistic, r.threshold, r.passed, r.proposed_batch_size) == (pytest.approx(1 / 6), 0.125, False, 4)
    assert orthogonality_test(G3, 3).passed  # nu = 5.84: threshold 68.2


def test_augmented_test_by_hand():
    r = augmented_test(G3, 3, theta=0.4, nu=0.25)  # proposals 5 (inner product) and 4 (orthogonality)
    assert (r.passed, r.proposed_batch_size, r.statistic) == (False, 5, 1.0)
    assert [p.name for p in r.parts] == ["inner_product", "orthogonality"]
    r = augmented_test(G3, 3, theta=0.9, nu=0.25)  # inner product passes, orthogonality asks for 4
    assert (r.passed, r.proposed_batch_size, r.statistic) == (False, 4, pytest.approx(1 / 6))
    assert augmented_test(G3, 3).passed  # AdaBatchGrad's theta = 0.9, nu = 5.84


def test_group_estimator_by_hand():
    # two micro-batches of 2 and 4 examples with means (3,0) and (0,3): g = (6, 12)/6 = (1, 2), ||g||^2 = 5
    G = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    kw = dict(rows="groups", group_sizes=[2, 4])
    # G_j - g = (2,-2), (-1,1): Var = (2*8 + 4*2)/(2-1) = 24, Var/b = 4; theta 0.5: 1.25 -> ceil(19.2) = 20
    r = norm_test(G, 6, 0.5, **kw)
    assert (r.statistic, r.threshold, r.proposed_batch_size) == (4.0, 1.25, 20)
    # <G_j, g> - 5 = -2, 1: Var_ip = 2*4 + 4*1 = 12, Var_ip/b = 2; theta 0.2: 0.04*25 = 1 -> 12
    r = inner_product_test(G, 6, 0.2, **kw)
    assert (r.statistic, r.threshold, r.proposed_batch_size) == (2.0, pytest.approx(1.0), 12)
    # orthogonal parts (3,0) - 0.6 (1,2) = (2.4,-1.2) -> 7.2 and (0,3) - 1.2 (1,2) = (-1.2,0.6) -> 1.8
    # Var_perp = 2*7.2 + 4*1.8 = 21.6; nu 0.5: 1.25 -> ceil(17.28) = 18
    r = orthogonality_test(G, 6, 0.5, **kw)
    assert (r.statistic, r.proposed_batch_size) == (pytest.approx(3.6), 18)
    # equal groups by default: b = 8 as 2 x 4; means (1,0), (3,2): g = (2,1), Var = (4*2 + 4*2)/1 = 16
    r = norm_test(torch.tensor([[1.0, 0.0], [3.0, 2.0]]), 8, 0.5, rows="groups")
    assert (r.statistic, r.proposed_batch_size) == (2.0, 13)  # ceil(16/1.25) = ceil(12.8)


def _loop_statistics(G: np.ndarray, w: np.ndarray) -> tuple[float, float, float]:
    """Var, Var_ip, Var_perp by plain loops: sum_j w_j s_j / (m - 1) with the weighted mean g."""
    m, P = G.shape
    g = [sum(w[j] * G[j, i] for j in range(m)) / sum(w) for i in range(P)]
    gg = sum(v * v for v in g)
    var = var_ip = var_perp = 0.0
    for j in range(m):
        dot = sum(G[j, i] * g[i] for i in range(P))
        var += w[j] * sum((G[j, i] - g[i]) ** 2 for i in range(P))
        var_ip += w[j] * (dot - gg) ** 2
        var_perp += w[j] * sum((G[j, i] - dot / gg * g[i]) ** 2 for i in range(P))
    return var / (m - 1), var_ip / (m - 1), var_perp / (m - 1)


@pytest.mark.parametrize("rows", ["examples", "groups"])
def test_statistics_match_plain_loops(rows):
    rng = np.random.default_rng(3)
    G = rng.normal(0.3, 1.0, size=(7, 5))
    w = np.ones(7) if rows == "examples" else np.array([1, 4, 2, 3, 5, 2, 3])
    b = int(w.sum())
    kw = {"rows": rows} if rows == "examples" else {"rows": rows, "group_sizes": w.tolist()}
    var, var_ip, var_perp = _loop_statistics(G, w)
    assert norm_test(G, b, **kw).statistic == pytest.approx(var / b, rel=1e-12)
    assert inner_product_test(G, b, **kw).statistic == pytest.approx(var_ip / b, rel=1e-12)
    assert orthogonality_test(G, b, **kw).statistic == pytest.approx(var_perp / b, rel=1e-12)
    if rows == "examples":  # groups of one example are the exact estimator
        assert norm_test(G, 7, rows="groups", group_sizes=[1] * 7).statistic == pytest.approx(var / 7, rel=1e-12)


def test_zero_mean_gradient_is_skipped():
    G = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])  # mean 0
    for name in ("norm", "inner_product", "orthogonality", "augmented"):
        r = run_test(name, G, 2)
        assert r.skipped is not None and "zero" in r.skipped
        assert r.passed is None and r.proposed_batch_size == 2 and math.isfinite(r.statistic)
    assert run_test("norm", torch.zeros(3, 4), 3).statistic == 0.0


def test_batch_test_bad_input():
    with pytest.raises(ValueError, match="at least 2 rows"):
        norm_test(torch.ones(1, 3), 1)
    with pytest.raises(ValueError, match="theta must be a positive finite number"):
        norm_test(G3, 3, theta=0.0)
    with pytest.raises(ValueError, match="theta must be"):
        inner_product_test(G3, 3, theta=-0.9)
    with pytest.raises(ValueError, match="nu must be a positive finite number"):
        orthogonality_test(G3, 3, nu=float("nan"))
    with pytest.raises(ValueError, match="nu must be"):
        augmented_test(G3, 3, nu=0)
    with pytest.raises(ValueError, match="one row per example"):
        norm_test(G3, 4)
    with pytest.raises(ValueError, match="sum to 5"):
        norm_test(G3, 6, rows="groups", group_sizes=[1, 2, 2])
    with pytest.raises(ValueError, match="3 rows"):
        norm_test(G3, 3, rows="groups", group_sizes=[1, 2])
    with pytest.raises(ValueError, match="NaN"):
        norm_test(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), 2)
    with pytest.raises(ValueError, match="matrix"):
        norm_test(torch.ones(3), 3)
    with pytest.raises(ValueError, match="unknown batch-size test"):
        run_test("variance", G3, 3)


# --- batch-size controller -----------------------------------------------------------------------

def asking_for(proposal: int, b: int) -> torch.Tensor:
    """Two equal groups whose norm test (theta = 1) proposes ``proposal`` at batch size b:
    means (1 +- a, 0) give g = (1, 0) and Var = (b/2)(2a^2) = b a^2 = proposal - 1/2."""
    a = math.sqrt((proposal - 0.5) / b)
    return torch.tensor([[1 + a, 0.0], [1 - a, 0.0]], dtype=F64)


def test_controller_schedule_by_hand(caplog):
    c = BatchSizeController(BatchSizeConfig(max_batch=100, test="norm", theta=1.0, window=3, initial_batch=10))
    asks = [30, 20, 80, 15, 90, 70, 500, 400, 300, 300]
    # the window holds the last 3 proposals (a passing test proposes the current size) and the
    # batch grows to their minimum once the window is full:
    # [30] | [30,20] | [30,20,80] -> 20 | [20,80,20] (15 passes at b = 20) | [80,20,90] | [20,90,70]
    # | [90,70,500] -> 70 | [70,500,400] | [500,400,300] -> 300, capped at 100 | stays at the cap
    expected = [10, 10, 20, 20, 20, 20, 70, 70, 100, 100]
    with caplog.at_level(logging.INFO, logger="paperlib.adaptive"):
        got = [c.update(asking_for(p, c.batch_size), rows="groups") for p in asks]
    assert got == expected
    assert [r.proposal for r in c.history] == [30, 20, 80, 20, 90, 70, 500, 400, 300, 300]
    assert [r.passed for r in c.history] == [False, False, False, True] + [False] * 6
    assert [r.capped for r in c.history] == [False] * 8 + [True, True]
    assert [r.batch_size for r in c.history] == [10] + expected[:-1]
    assert sum("capped at max_batch=100" in m for m in caplog.messages) == 1  # logged when the cap is hit


def noisy_rows(b: int, gen: torch.Generator, along: float = 3.0, across: float = 3.0) -> torch.Tensor:
    """b gradients with mean (1, 0) and noise of std ``along`` the mean and ``across`` it."""
    rows = torch.zeros(b, 2, dtype=F64)
    rows[:, 0] = 1 + along * torch.randn(b, generator=gen, dtype=F64)
    rows[:, 1] = across * torch.randn(b, generator=gen, dtype=F64)
    return rows


@pytest.mark.parametrize("test", ["norm", "inner_product", "orthogonality", "augmented"])
def test_controller_grows_on_noise_only(test):
    gen = torch.Generator().manual_seed(0)
    # The tests measure the noise against the *sampled* ||g||^2, which noise inflates, so they are
    # lenient at small batches (with theta = 0.9 this noise would need only b ~ 4); theta = nu = 0.5
    # ask for b ~ 3 Var/||E g||^2 = 54 (norm test).
    cfg = BatchSizeConfig(max_batch=400, test=test, initial_batch=8, theta=0.5, nu=0.5)
    noisy, calm = BatchSizeController(cfg), BatchSizeController(cfg)
    sizes = []
    for _ in range(30):
        noisy.update(noisy_rows(noisy.batch_size, gen))
        calm.update(torch.ones(calm.batch_size, 2))  # every example has the same gradient
        sizes.append(noisy.batch_size)
    assert sizes[-1] > 8 and sizes[:4] == [8] * 4  # grows, once the window of 5 proposals is full
    assert all(b2 >= b1 for b1, b2 in zip(sizes, sizes[1:])) and max(sizes) <= 400
    assert calm.batch_size == 8 and all(r.passed for r in calm.history)


def test_controller_respects_the_cap():
    gen = torch.Generator().manual_seed(0)
    c = BatchSizeController(BatchSizeConfig(max_batch=12, initial_batch=4, window=2, theta=0.5))
    for _ in range(10):
        c.update(noisy_rows(c.batch_size, gen))
    assert c.batch_size == 12 and any(r.capped for r in c.history)


def test_controller_with_model_gradients():
    """Logistic regression near its optimum: per-example gradients disagree, so the batch grows;
    with every example identical the batch stays."""
    torch.manual_seed(0)
    X = torch.randn(512, 3)
    y = (torch.rand(512) < 0.5).float()  # labels independent of X: the optimum has a zero mean gradient
    identical_X, identical_y = X[:1].expand(512, 3), y[:1].expand(512)
    for data, grows in [((X, y), True), ((identical_X, identical_y), False)]:
        model = nn.Linear(3, 1)
        ctrl = BatchSizeController(BatchSizeConfig(max_batch=512, test="norm", initial_batch=16, theta=0.5))
        opt = AdaGradNorm(model.parameters(), alpha=0.5)
        loss_fn = lambda out, t: nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), t)  # noqa: E731
        start = 0
        for _ in range(25):
            b = ctrl.batch_size
            idx = torch.arange(start, start + b) % 512
            start += b
            grads = group_gradients(model.parameters(), lambda mb: loss_fn(model(mb[0]), mb[1]),
                                    split_batch((data[0][idx], data[1][idx]), 8))
            set_flat_grad(model.parameters(), grads.mean)
            opt.step()
            ctrl.update(grads.rows, **grads.test_kwargs())
        assert (ctrl.batch_size > 16) == grows


def test_controller_skips_zero_gradient():
    c = BatchSizeController(BatchSizeConfig(max_batch=50, initial_batch=4))
    assert c.update(torch.tensor([[1.0, 1.0], [-1.0, -1.0], [2.0, 2.0], [-2.0, -2.0]])) == 4
    assert c.history[0].skipped is not None and c.proposals == []


def test_controller_resume_is_exact():
    cfg = BatchSizeConfig(max_batch=300, test="augmented", initial_batch=4, window=3, theta=0.5, nu=0.5)

    def drive(ctrl: BatchSizeController, steps: range) -> None:
        for k in steps:
            ctrl.update(noisy_rows(ctrl.batch_size, torch.Generator().manual_seed(k)))

    full = BatchSizeController(cfg)
    drive(full, range(25))
    part = BatchSizeController(cfg)
    drive(part, range(9))
    resumed = BatchSizeController(cfg)
    resumed.load_state_dict(roundtrip(part.state_dict()))
    drive(resumed, range(9, 25))
    assert resumed.history == full.history and resumed.batch_size == full.batch_size
    assert len({r.batch_size for r in full.history}) > 1  # the schedule did change
    other = BatchSizeController(BatchSizeConfig(max_batch=300, test="norm", initial_batch=4, window=3, theta=0.5,
                                                nu=0.5))
    with pytest.raises(ValueError, match="test='augmented'"):
        other.load_state_dict(part.state_dict())


@pytest.mark.parametrize("field,bad,match", [
    ("theta", 0.0, "theta must be a positive"), ("theta", -0.5, "theta must be"), ("nu", 0, "nu must be"),
    ("nu", float("inf"), "nu must be"), ("test", "variance", "test must be one of"),
    ("window", 0, "window must be a positive int"), ("initial_batch", 1, "at least 2"),
    ("initial_batch", 200, "exceeds max_batch"),
])
def test_controller_config_errors(field, bad, match):
    with pytest.raises(ValueError, match=match):
        BatchSizeConfig(max_batch=100, **{field: bad})


# --- gradient matrices ---------------------------------------------------------------------------

def _tiny_problem():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(10, 3, dtype=F64), torch.randint(0, 2, (10,))
    return model, X, y


def _full_batch_grad(model, X, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_group_gradients_rows_and_mean():
    model, X, y = _tiny_problem()
    parts = split_batch((X, y), 3)
    assert [len(p[1]) for p in parts] == [4, 3, 3]
    res = group_gradients(model.parameters(), lambda mb: nn.functional.cross_entropy(model(mb[0]), mb[1]), parts)
    assert res.rows.shape == (3, sum(p.numel() for p in model.parameters())) and res.sizes.tolist() == [4, 3, 3]
    for j, (xj, yj) in enumerate(parts):
        assert torch.allclose(res.rows[j], _full_batch_grad(model, xj, yj), rtol=0, atol=1e-15)
    assert torch.allclose(res.mean, _full_batch_grad(model, X, y), rtol=0, atol=1e-15)
    assert res.loss == pytest.approx(nn.functional.cross_entropy(model(X), y).item(), rel=1e-14)
    assert res.test_kwargs()["rows"] == "groups" and res.batch_size == 10
    model.zero_grad()
    set_flat_grad(model.parameters(), res.mean)
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), res.mean, rtol=0, atol=0)
    with pytest.raises(ValueError, match="parameters need"):
        set_flat_grad(model.parameters(), res.mean[:-1])


def test_per_example_gradients_match_a_loop():
    model, X, y = _tiny_problem()
    for chunk in (None, 4):
        res = per_example_gradients(model, nn.functional.cross_entropy, X, y, chunk_size=chunk)
        for i in range(10):
            assert torch.allclose(res.rows[i], _full_batch_grad(model, X[i:i + 1], y[i:i + 1]), rtol=0, atol=1e-14)
        assert torch.allclose(res.mean, _full_batch_grad(model, X, y), rtol=0, atol=1e-14)
        assert res.kind == "examples" and res.sizes.tolist() == [1] * 10
    # the exact estimator equals the group estimator with micro-batches of one example
    groups = group_gradients(model.parameters(), lambda mb: nn.functional.cross_entropy(model(mb[0]), mb[1]),
                             split_batch((X, y), 10))
    assert norm_test(res.rows, 10).statistic == pytest.approx(norm_test(groups.rows, 10, rows="groups").statistic,
                                                              rel=1e-12)


def test_gradient_helpers_bad_input():
    model, X, y = _tiny_problem()
    with pytest.raises(ValueError, match="m=11"):
        split_batch((X, y), 11)
    with pytest.raises(ValueError, match="same first dimension"):
        split_batch((X, y[:5]), 2)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        per_example_gradients(model, nn.functional.cross_entropy, X, y[:5])
    with pytest.raises(ValueError, match="no micro-batches"):
        group_gradients(model.parameters(), lambda mb: mb, [])
