"""Batch-size tests: is the mini-batch gradient accurate enough, and if not, how large a batch is?

Each test is a pure function of a matrix ``G`` of shape (n, P): n gradient vectors of P
parameters, flattened. The batch S has size b and mean gradient g. With per-example gradients g_i
and variances taken with 1/(b - 1):

* **Norm test** (Byrd, Chin, Nocedal, Wu 2012, "Sample size selection in optimization methods
  for machine learning"): ``Var = sum_i ||g_i - g||^2 / (b - 1)``; passes if
  ``Var / b <= theta^2 ||g||^2``, else proposes ``b_new = ceil(Var / (theta^2 ||g||^2))``.
* **Inner-product test** (Bollapragada, Byrd, Nocedal 2018, "Adaptive sampling strategies for
  stochastic optimization", eq. 2.6): ``Var_ip = sum_i (<g_i, g> - ||g||^2)^2 / (b - 1)``; passes
  if ``Var_ip / b <= theta^2 ||g||^4``, else ``b_new = ceil(Var_ip / (theta^2 ||g||^4))``.
* **Orthogonality test** (same paper): ``Var_perp = sum_i ||g_i - (<g_i, g>/||g||^2) g||^2 /
  (b - 1)``; passes if ``Var_perp / b <= nu^2 ||g||^2``, else
  ``b_new = ceil(Var_perp / (nu^2 ||g||^2))``.
* **Augmented inner-product test** (same paper): inner-product and orthogonality tests together;
  passes if both pass and proposes the larger of their two proposals.

AdaBatchGrad (Ostroukhov et al. 2024, arXiv:2402.05264) runs these tests with theta = 0.9 and
nu = 5.84; :mod:`paperlib.adaptive.controller` turns their proposals into a batch schedule.

Two estimators, chosen with ``rows``:

* ``rows="examples"`` (exact): the n = b rows are the per-example gradients g_i of the batch;
  the sums above are used as written.
* ``rows="groups"`` (cheap, works with any model): the batch is split into m micro-batches and
  the m rows are their mean gradients G_j, of sizes n_j (``group_sizes``; by default m equal
  groups of b/m). A micro-batch mean has variance Var / n_j, so the per-example variance is
  estimated from the spread of the group means:
  ``Var ~ sum_j n_j ||G_j - g||^2 / (m - 1)``, which for equal groups is the usual cheap
  estimate ``(b/m) sum_j ||G_j - g||^2 / (m - 1)``; ``Var_ip`` and
  ``Var_perp`` are estimated the same way from ``<G_j, g>`` and the orthogonal part of G_j.
  Here g is the size-weighted mean of the rows, i.e. exactly the batch's mean gradient. For
  ``Var`` this is the between-group sum of squares, unbiased like the per-example estimate, but
  with only m - 1 degrees of freedom instead of b - 1, so it is noisier.

Both are one formula, ``sum_j w_j s_j / (m - 1)`` with weights w_j = 1 (examples) or n_j (groups).
All arithmetic is done in float64.

A zero mean gradient makes every threshold zero: the test is then *skipped* (``skipped`` holds
the reason, ``passed`` is None, the proposal is the current batch size); it never divides by
zero or returns NaN.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Rows = Literal["examples", "groups"]
ROWS: tuple[str, ...] = ("examples", "groups")
TESTS: tuple[str, ...] = ("norm", "inner_product", "orthogonality", "augmented")

ZERO_GRADIENT = "mean gradient is zero: the test's threshold is zero, so it cannot be evaluated"


@dataclass(frozen=True)
class BatchTestResult:
    """Outcome of one batch-size test on one batch.

    Attributes:
        name: "norm", "inner_product", "orthogonality" or "augmented".
        statistic: left-hand side of the test, the estimated variance of the batch mean
            (``Var / b``, ``Var_ip / b`` or ``Var_perp / b``).
        threshold: right-hand side (``theta^2 ||g||^2``, ``theta^2 ||g||^4`` or
            ``nu^2 ||g||^2``); 0.0 when skipped.
        passed: ``statistic <= threshold``; None when skipped.
        proposed_batch_size: the batch size the test asks for: the current b when it passes (or
            is skipped), else ``ceil(b * statistic / threshold)`` (> b).
        batch_size: the current batch size b the test was run for.
        skipped: why the test could not be evaluated (zero mean gradient), else None.
        parts: for "augmented", the inner-product and orthogonality results it combines (its own
            statistic and threshold are those of the part with the larger proposal); else ().
    """

    name: str
    statistic: float
    threshold: float
    passed: bool | None
    proposed_batch_size: int
    batch_size: int
    skipped: str | None = None
    parts: tuple[BatchTestResult, ...] = ()


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _prepare(
    G: torch.Tensor | np.ndarray, batch_size: int, rows: str, group_sizes: Sequence[int] | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the input and return (rows (m, P) float64, weights (m,) float64)."""
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    G = torch.as_tensor(G).detach()
    if G.dim() != 2:
        raise ValueError(f"G must be a matrix (n, P) of flattened gradients, got shape {tuple(G.shape)}")
    m = G.shape[0]
    if m < 2:
        raise ValueError(f"G needs at least 2 rows to estimate a variance, got {m}; "
                         "use a batch of >= 2 examples or split it into >= 2 micro-batches")
    G = G.to(torch.float64)
    if not torch.isfinite(G).all():
        raise ValueError("G contains NaN or infinite entries: check the loss before testing the batch size")
    if rows == "examples":
        if group_sizes is not None:
            raise ValueError("group_sizes is only used with rows='groups'")
        if m != batch_size:
            raise ValueError(f"rows='examples' needs one row per example: G has {m} rows but "
                             f"batch_size={batch_size}; pass rows='groups' for micro-batch means")
        return G, torch.ones(m, dtype=torch.float64)
    if group_sizes is None:
        # m equal groups of b/m examples (b/m need not be an integer: only the weight matters)
        return G, torch.full((m,), batch_size / m, dtype=torch.float64)
    sizes = torch.as_tensor(group_sizes, dtype=torch.float64).flatten()
    if sizes.numel() != m:
        raise ValueError(f"group_sizes has {sizes.numel()} entries but G has {m} rows (one per group)")
    if not (sizes > 0).all():
        raise ValueError(f"group sizes must be positive, got {sizes.tolist()}")
    if float(sizes.sum()) != float(batch_size):
        raise ValueError(f"group sizes sum to {float(sizes.sum()):g} but batch_size={batch_size}")
    return G, sizes


def _mean(G: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the rows: the batch's mean gradient g, shape (P,)."""
    return (w[:, None] * G).sum(0) / w.sum()


def _weighted_variance(per_row: torch.Tensor, w: torch.Tensor) -> float:
    """``sum_j w_j s_j / (m - 1)``: per-example variance from m rows (see the module docstring)."""
    return float((w * per_row).sum() / (per_row.numel() - 1))


def _result(name: str, variance: float, threshold_per_example: float, b: int) -> BatchTestResult:
    """Compare ``variance / b`` with the threshold and propose ``ceil(variance / threshold)``."""
    statistic = variance / b
    passed = statistic <= threshold_per_example
    proposal = b if passed else max(b + 1, math.ceil(variance / threshold_per_example))
    return BatchTestResult(name, statistic, threshold_per_example, passed, int(proposal), int(b))


def _skipped(name: str, variance: float, b: int) -> BatchTestResult:
    return BatchTestResult(name, variance / b, 0.0, None, int(b), int(b), skipped=ZERO_GRADIENT)


def norm_test(
    G: torch.Tensor | np.ndarray,
    batch_size: int,
    theta: float = 0.9,
    *,
    rows: Rows = "examples",
    group_sizes: Sequence[int] | torch.Tensor | None = None,
) -> BatchTestResult:
    """Norm test of Byrd et al. (2012): ``Var / b <= theta^2 ||g||^2``.

    Args:
        G: (n, P) per-example gradients (``rows="examples"``, n = batch_size) or micro-batch mean
            gradients (``rows="groups"``), one flattened gradient per row.
        batch_size: the batch size b whose mean gradient is tested.
        theta: accuracy, > 0 (AdaBatchGrad: 0.9).
        rows: which estimator, see the module docstring.
        group_sizes: (n,) sizes of the micro-batches (``rows="groups"``), summing to batch_size;
            None means n equal groups.

    Returns:
        BatchTestResult with ``statistic = Var / b`` and ``threshold = theta^2 ||g||^2``.
    """
    theta = _positive("theta", theta)
    X, w = _prepare(G, batch_size, rows, group_sizes)
    g = _mean(X, w)
    variance = _weighted_variance(((X - g) ** 2).sum(1), w)
    g2 = float(g @ g)
    if g2 == 0.0:
        return _skipped("norm", variance, batch_size)
    return _result("norm", variance, theta**2 * g2, batch_size)


def inner_product_test(
    G: torch.Tensor | np.ndarray,
    batch_size: int,
    theta: float = 0.9,
    *,
    rows: Rows = "examples",
    group_sizes: Sequence[int] | torch.Tensor | None = None,
) -> BatchTestResult:
    """Inner-product test of Bollapragada, Byrd, Nocedal (2018, eq. 2.6):
    ``Var_ip / b <= theta^2 ||g||^4`` with ``Var_ip`` the variance of ``<g_i, g>``.

    Arguments as :func:`norm_test`. Returns a BatchTestResult with ``statistic = Var_ip / b`` and
    ``threshold = theta^2 ||g||^4``.
    """
    theta = _positive("theta", theta)
    X, w = _prepare(G, batch_size, rows, group_sizes)
    g = _mean(X, w)
    g2 = float(g @ g)
    variance = _weighted_variance((X @ g - g2) ** 2, w)
    if g2 == 0.0:
        return _skipped("inner_product", variance, batch_size)
    return _result("inner_product", variance, theta**2 * g2**2, batch_size)


def orthogonality_test(
    G: torch.Tensor | np.ndarray,
    batch_size: int,
    nu: float = 5.84,
    *,
    rows: Rows = "examples",
    group_sizes: Sequence[int] | torch.Tensor | None = None,
) -> BatchTestResult:
    """Orthogonality test of Bollapragada, Byrd, Nocedal (2018): ``Var_perp / b <= nu^2 ||g||^2``
    with ``Var_perp`` the variance of the part of g_i orthogonal to g.

    Arguments as :func:`norm_test`, with ``nu`` > 0 (AdaBatchGrad: 5.84) in place of theta.
    Returns a BatchTestResult with ``statistic = Var_perp / b`` and ``threshold = nu^2 ||g||^2``.
    """
    nu = _positive("nu", nu)
    X, w = _prepare(G, batch_size, rows, group_sizes)
    g = _mean(X, w)
    g2 = float(g @ g)
    if g2 == 0.0:
        return _skipped("orthogonality", _weighted_variance((X**2).sum(1), w), batch_size)
    orthogonal = X - torch.outer(X @ g / g2, g)
    variance = _weighted_variance((orthogonal**2).sum(1), w)
    return _result("orthogonality", variance, nu**2 * g2, batch_size)


def augmented_test(
    G: torch.Tensor | np.ndarray,
    batch_size: int,
    theta: float = 0.9,
    nu: float = 5.84,
    *,
    rows: Rows = "examples",
    group_sizes: Sequence[int] | torch.Tensor | None = None,
) -> BatchTestResult:
    """Augmented inner-product test (Bollapragada, Byrd, Nocedal 2018): the inner-product and
    orthogonality tests together; passes if both pass, proposes the larger proposal.

    Returns a BatchTestResult whose statistic and threshold are those of the part with the larger
    proposal (the inner-product part on a tie) and whose ``parts`` holds both results.
    """
    ip = inner_product_test(G, batch_size, theta, rows=rows, group_sizes=group_sizes)
    orth = orthogonality_test(G, batch_size, nu, rows=rows, group_sizes=group_sizes)
    if ip.skipped is not None:
        return BatchTestResult("augmented", ip.statistic, 0.0, None, int(batch_size), int(batch_size),
                               skipped=ip.skipped, parts=(ip, orth))
    lead = orth if orth.proposed_batch_size > ip.proposed_batch_size else ip
    return BatchTestResult("augmented", lead.statistic, lead.threshold, bool(ip.passed and orth.passed),
                           max(ip.proposed_batch_size, orth.proposed_batch_size), int(batch_size),
                           parts=(ip, orth))


def run_test(
    test: str,
    G: torch.Tensor | np.ndarray,
    batch_size: int,
    *,
    theta: float = 0.9,
    nu: float = 5.84,
    rows: Rows = "examples",
    group_sizes: Sequence[int] | torch.Tensor | None = None,
) -> BatchTestResult:
    """Run the test named ``test`` (one of :data:`TESTS`) with the parameters it uses."""
    if test == "norm":
        return norm_test(G, batch_size, theta, rows=rows, group_sizes=group_sizes)
    if test == "inner_product":
        return inner_product_test(G, batch_size, theta, rows=rows, group_sizes=group_sizes)
    if test == "orthogonality":
        return orthogonality_test(G, batch_size, nu, rows=rows, group_sizes=group_sizes)
    if test == "augmented":
        return augmented_test(G, batch_size, theta, nu, rows=rows, group_sizes=group_sizes)
    raise ValueError(f"unknown batch-size test {test!r}; choose one of {TESTS}")
