"""Adaptive batch size and step size (the third study of arXiv:2408.05606).

* :mod:`~paperlib.adaptive.optim`: step-size rules as ``torch.optim`` optimizers --
  :class:`AdaGradNorm` (AdaBatchGrad's step, arXiv:2402.05264) and :class:`USGM` (Rodomanov et al.
  2024, arXiv:2402.03210, Algorithm 4.1).
* :mod:`~paperlib.adaptive.batch_tests`: the norm test (Byrd et al. 2012), the inner-product,
  orthogonality and augmented tests (Bollapragada, Byrd, Nocedal 2018), as pure functions of a
  gradient matrix G (n, P).
* :mod:`~paperlib.adaptive.controller`: :class:`BatchSizeController`, AdaBatchGrad's growing
  batch-size schedule.
* :mod:`~paperlib.adaptive.grads`: G from a torch model, by micro-batches or per example.
"""

from paperlib.adaptive.batch_tests import (
    TESTS,
    BatchTestResult,
    augmented_test,
    inner_product_test,
    norm_test,
    orthogonality_test,
    run_test,
)
from paperlib.adaptive.controller import BatchSizeConfig, BatchSizeController, BatchSizeRecord
from paperlib.adaptive.grads import (
    BatchGradients,
    group_gradients,
    per_example_gradients,
    set_flat_grad,
    split_batch,
)
from paperlib.adaptive.optim import USGM, AdaGradNorm

__all__ = [
    "TESTS",
    "USGM",
    "AdaGradNorm",
    "BatchGradients",
    "BatchSizeConfig",
    "BatchSizeController",
    "BatchSizeRecord",
    "BatchTestResult",
    "augmented_test",
    "group_gradients",
    "inner_product_test",
    "norm_test",
    "orthogonality_test",
    "per_example_gradients",
    "run_test",
    "set_flat_grad",
    "split_batch",
]
