"""Batch-size schedule of AdaBatchGrad: grow the batch when the batch-size tests ask for it.

AdaBatchGrad (Ostroukhov et al. 2024, arXiv:2402.05264) runs a batch-size test (norm test of
Byrd et al. 2012, or the inner-product / orthogonality / augmented tests of Bollapragada, Byrd,
Nocedal 2018; see :mod:`paperlib.adaptive.batch_tests`) on every step's gradients. Each test
proposes a batch size (the current one when it passes). The batch only grows: to the minimum of
the last k proposals (k = 5) when that minimum exceeds the current size, capped at ``max_batch``
(the number of training examples). Taking the minimum over a window keeps one noisy estimate
from inflating the batch; for the same reason the batch does not grow before k proposals have
been made (the first k - 1 steps run at ``initial_batch``). The window is not cleared when the
batch grows: a proposal estimates the batch size needed, whatever the batch it came from. A
skipped test (zero mean gradient) adds no proposal.

The tests compare the noise with the *sampled* ||g||^2, which the noise itself inflates
(E||g||^2 = ||grad f||^2 + Var/b), so at small batches they are lenient: for the norm test the
batch settles near ``b = Var (1 - theta^2) / (theta^2 ||grad f||^2)``: with theta = 0.9 about a
fifth (1 - theta^2 = 0.19) of the ``Var / (theta^2 ||grad f||^2)`` one might expect.

Usage, once per optimizer step::

    controller = BatchSizeController(BatchSizeConfig(max_batch=len(train_set), initial_batch=32))
    b = controller.batch_size
    ...  # compute G for a batch of b examples (paperlib.adaptive.grads), take the step
    b = controller.update(G, rows="groups", group_sizes=sizes)   # batch size of the next step
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from paperlib.adaptive.batch_tests import TESTS, BatchTestResult, Rows, run_test

logger = logging.getLogger("paperlib.adaptive")


@dataclass
class BatchSizeConfig:
    """Settings of :class:`BatchSizeController` (defaults: AdaBatchGrad's test code).

    Attributes:
        max_batch: cap on the batch size, e.g. the number of training examples.
        test: "norm", "inner_product", "orthogonality" or "augmented".
        theta: accuracy of the norm and inner-product tests, > 0.
        nu: accuracy of the orthogonality test, > 0.
        window: k, the number of recent proposals whose minimum the batch grows to.
        initial_batch: batch size of the first step (also the smallest, as the batch only grows).
    """

    max_batch: int
    test: Literal["norm", "inner_product", "orthogonality", "augmented"] = "norm"
    theta: float = 0.9
    nu: float = 5.84
    window: int = 5
    initial_batch: int = 32

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise ValueError(f"test must be one of {TESTS}, got {self.test!r}")
        for name in ("theta", "nu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("max_batch", "window", "initial_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            setattr(self, name, int(value))
        if self.initial_batch < 2:
            raise ValueError(f"initial_batch must be at least 2 (a variance needs two gradients), "
                             f"got {self.initial_batch}")
        if self.initial_batch > self.max_batch:
            raise ValueError(f"initial_batch ({self.initial_batch}) exceeds max_batch ({self.max_batch})")


@dataclass(frozen=True)
class BatchSizeRecord:
    """What the controller saw and decided at one step.

    Attributes:
        step: 0-based index of the update.
        batch_size: batch size the test was run for (this step's batch).
        statistic, threshold, passed, skipped: the test's outcome (see BatchTestResult).
        proposal: the test's proposed batch size.
        new_batch_size: batch size chosen for the next step.
        capped: True when the growth was limited by ``max_batch``.
    """

    step: int
    batch_size: int
    statistic: float
    threshold: float
    passed: bool | None
    proposal: int
    new_batch_size: int
    capped: bool
    skipped: str | None


@dataclass
class BatchSizeController:
    """Chooses each step's batch size from the previous step's gradients (AdaBatchGrad).

    Attributes:
        config: the settings.
        batch_size: batch size of the current step.
        proposals: the last ``config.window`` proposals (oldest first).
        history: one :class:`BatchSizeRecord` per :meth:`update`.
    """

    config: BatchSizeConfig
    batch_size: int = field(init=False)
    proposals: list[int] = field(init=False, default_factory=list)
    history: list[BatchSizeRecord] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, BatchSizeConfig):
            raise TypeError(f"config must be a BatchSizeConfig, got {type(self.config).__name__}")
        self.batch_size = self.config.initial_batch

    def test(self, G: torch.Tensor | np.ndarray, *, rows: Rows = "examples",
             group_sizes: Sequence[int] | torch.Tensor | None = None) -> BatchTestResult:
        """Run the configured test on this step's gradients G (n, P), without changing anything."""
        c = self.config
        return run_test(c.test, G, self.batch_size, theta=c.theta, nu=c.nu, rows=rows, group_sizes=group_sizes)

    def update(self, G: torch.Tensor | np.ndarray, *, rows: Rows = "examples",
               group_sizes: Sequence[int] | torch.Tensor | None = None) -> int:
        """Test this step's gradients and return the batch size for the next step.

        Args:
            G: (n, P) gradients of the current batch of ``batch_size`` examples: per-example rows
                (``rows="examples"``, n = batch_size) or micro-batch means (``rows="groups"``).
            rows, group_sizes: the estimator, see :mod:`paperlib.adaptive.batch_tests`.

        Returns:
            The new batch size (>= the current one, <= ``max_batch``); also in ``batch_size``.
        """
        result = self.test(G, rows=rows, group_sizes=group_sizes)
        current, new, capped = self.batch_size, self.batch_size, False
        if result.skipped is None:
            self.proposals = (self.proposals + [result.proposed_batch_size])[-self.config.window:]
            target = min(self.proposals)
            if len(self.proposals) == self.config.window and target > current:
                new = min(target, self.config.max_batch)
                capped = new < target
                if capped:
                    # INFO when the cap is reached, DEBUG once the batch is already at the cap
                    logger.log(logging.INFO if new > current else logging.DEBUG,
                               "batch size %d -> %d: the test asked for %d, capped at max_batch=%d",
                               current, new, target, self.config.max_batch)
                else:
                    logger.debug("batch size %d -> %d", current, new)
        else:
            logger.debug("batch-size test skipped at step %d: %s", len(self.history), result.skipped)
        self.history.append(BatchSizeRecord(
            step=len(self.history), batch_size=current, statistic=result.statistic,
            threshold=result.threshold, passed=result.passed, proposal=result.proposed_batch_size,
            new_batch_size=new, capped=capped, skipped=result.skipped))
        self.batch_size = new
        return new

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "config": asdict(self.config),
            "batch_size": self.batch_size,
            "proposals": list(self.proposals),
            "history": [asdict(r) for r in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the schedule saved by :meth:`state_dict`; the configs must agree."""
        mine = asdict(self.config)
        saved = state["config"]
        differ = sorted(k for k in set(mine) | set(saved) if mine.get(k) != saved.get(k))
        if differ:
            raise ValueError("the saved batch-size schedule was made with another config: "
                             + ", ".join(f"{k}={saved.get(k)!r} (now {mine.get(k)!r})" for k in differ))
        self.batch_size = int(state["batch_size"])
        self.proposals = [int(p) for p in state["proposals"]]
        self.history = [BatchSizeRecord(**r) for r in state["history"]]
