"""Adaptive batch size inside :class:`paperlib.train.Trainer`.

:class:`AdaptiveBatchSize` is a trainer callback. The trainer computes each step's gradient as the
pair-weighted mean of ``gradient_groups`` micro-batch gradients (``TrainConfig.gradient_groups``:
the same arithmetic as one backward pass, in m pieces); after the backward pass the callback runs
the batch-size test on those m rows (the group estimator of :mod:`paperlib.adaptive.batch_tests`)
and sets the loader's batch size for the very next step, without restarting the pass. Batch sizes
count (prefix, target) pairs, as everywhere in the project. The controller's state is saved in
every checkpoint, so a resumed run continues the schedule exactly.

Several processes (a process group, see :mod:`paperlib.train`): the batch size is global (the sum
of the ranks' shares), and ``trainer.gradients`` holds the micro-batch gradients of the whole
global batch on every rank (each rank computes some groups, the rows are all-reduced), so every
rank runs the test on all ranks' gradients and reaches the same statistic and the same new size.
Rank 0's choice is broadcast all the same, so that no float difference between devices can ever
give two ranks different batches.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from paperlib import distributed
from paperlib.adaptive.controller import BatchSizeConfig, BatchSizeController
from paperlib.train import Callback, Trainer


class AdaptiveBatchSize(Callback):
    """Grow the training batch with a batch-size test (AdaBatchGrad's schedule).

    Args:
        config: the controller's settings; ``initial_batch`` and ``max_batch`` count pairs. The
            loader cannot take fewer pairs than one training window holds, nor more than a pass.
    """

    def __init__(self, config: BatchSizeConfig) -> None:
        self.controller = BatchSizeController(config)
        self.budgets: list[int] = []  # the loader's batch size chosen after each step

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.config.gradient_groups < 2:
            raise ValueError("an adaptive batch size needs gradient_groups >= 2 in the TrainConfig: the "
                             "batch-size test estimates the gradient's variance from micro-batch gradients")
        max_batch = min(self.controller.config.max_batch, trainer.loader.n_pairs)
        if max_batch != self.controller.config.max_batch:
            raise ValueError(f"max_batch {self.controller.config.max_batch} is larger than a pass over the data "
                             f"({trainer.loader.n_pairs} pairs): use at most {trainer.loader.n_pairs}")
        trainer.loader.batch_size = self.controller.batch_size

    def after_backward(self, trainer: Trainer, batch: Any) -> None:
        grads = trainer.gradients
        if grads is None or grads.rows.shape[0] < 2:
            return  # a batch of one window cannot be split: no estimate this step
        budget = trainer.loader.batch_size
        # the test's b is the pairs this step actually had (whole windows: at most the budget);
        # the schedule itself stays on budgets, which only grow
        self.controller.batch_size = int(grads.sizes.sum())
        new = max(self.controller.update(grads.rows, **grads.test_kwargs()), budget)
        new = distributed.broadcast_object(new)  # the same size on every rank (a no-op in one process)
        self.controller.batch_size = trainer.loader.batch_size = new
        self.budgets.append(new)

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "budgets": list(self.budgets)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.budgets = [int(b) for b in state["budgets"]]

    def records(self) -> list[dict[str, Any]]:
        """One dict per tested step: the test's outcome (``statistic``, ``threshold``,
        ``proposal``, ``skipped``…, with ``batch_size`` the pairs tested) and ``budget``, the
        loader's batch size chosen for the next step."""
        return [{**asdict(r), "budget": b} for r, b in zip(self.controller.history, self.budgets)]
