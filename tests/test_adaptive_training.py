"""Adaptive batch size inside the trainer: the loader takes the new size at the next step, the
schedule only grows, and a resumed run continues it exactly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from paperlib.adaptive import USGM, AdaGradNorm, BatchSizeConfig
from paperlib.adaptive.training import AdaptiveBatchSize
from paperlib.data.sequences import SequentialData, count_pairs
from paperlib.models import build_model
from paperlib.train import Trainer, TrainConfig, fit

N_ITEMS, MAX_LEN = 20, 10


def noisy_data(n_users: int = 120, seed: int = 0) -> SequentialData:
    """Random walks with random jumps: a noisy next-item signal (unit-test data only)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        n = int(rng.integers(8, 16))
        s = [int(rng.integers(1, N_ITEMS + 1))]
        for _ in range(n - 1):
            s.append(s[-1] % N_ITEMS + 1 if rng.random() < 0.6 else int(rng.integers(1, N_ITEMS + 1)))
        seqs.append(np.array(s, dtype=np.int64))
    return SequentialData(name="noisy", sequences=seqs, n_items=N_ITEMS, max_len=MAX_LEN)


def model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("gru4rec", n_items=N_ITEMS, max_len=MAX_LEN, hidden_size=8, gru_hidden_size=8)


def config(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=24, eval_batch_size=64, lr=5e-3, device="cpu", gradient_groups=4,
                record_steps=True)
    return TrainConfig(**{**base, **kw})


def adaptive(data, **kw) -> AdaptiveBatchSize:
    return AdaptiveBatchSize(BatchSizeConfig(**{"max_batch": count_pairs(data), "initial_batch": 24,
                                                "test": "norm", "theta": 0.5, "window": 2, **kw}))


def test_group_gradients_equal_the_plain_gradient():
    data = noisy_data()
    a, b = model(), model()
    batch = next(iter(Trainer(a, data, config(gradient_groups=1, batch_size=60), progress=False).loader))
    ta = Trainer(a, data, config(gradient_groups=1), progress=False)
    tb = Trainer(b, data, config(gradient_groups=4), progress=False)
    a.eval(), b.eval()  # no dropout: both see the same function
    la, lb = ta.train_step(batch, 1, 1), tb.train_step(batch, 1, 1)
    assert la == pytest.approx(lb, rel=1e-5)
    assert batch.items.shape[0] >= 4  # enough windows for four groups
    assert tb.gradients.rows.shape[0] == 4 and int(tb.gradients.sizes.sum()) == batch.n_pairs
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)  # same update from the same gradient


def test_the_batch_grows_on_noisy_data_and_never_shrinks():
    data = noisy_data()
    cb = adaptive(data)
    result = fit(model(), data, config(), callbacks=[cb], progress=False)
    sizes = [s["batch_size"] for s in result.steps]
    budgets = [r["budget"] for r in cb.records()]
    assert budgets == sorted(budgets), "the schedule never decreases"
    assert budgets[-1] > 24, "noisy gradients make the test ask for more"
    assert all(s <= b for s, b in zip(sizes[1:], budgets)), "each batch respects the budget set before it"
    assert max(budgets) <= count_pairs(data)


def test_resume_continues_the_schedule_exactly(tmp_path):
    data = noisy_data()
    straight = fit(model(), data, config(), checkpoint_dir=tmp_path / "a", callbacks=[adaptive(data)], progress=False)
    fit(model(), data, config(epochs=2), checkpoint_dir=tmp_path / "b", callbacks=[adaptive(data)], progress=False)
    resumed = fit(model(seed=5), data, config(), checkpoint_dir=tmp_path / "b", callbacks=[adaptive(data)],
                  resume=True, progress=False)
    assert [s["batch_size"] for s in straight.steps] == [s["batch_size"] for s in resumed.steps]
    assert [s["loss"] for s in straight.steps] == [s["loss"] for s in resumed.steps]
    assert straight.test == resumed.test


def test_adaptive_batch_needs_gradient_groups():
    data = noisy_data()
    with pytest.raises(ValueError, match="gradient_groups >= 2"):
        fit(model(), data, config(gradient_groups=1), callbacks=[adaptive(data)], progress=False)


@pytest.mark.parametrize("make", [lambda p: AdaGradNorm(p, alpha=0.05), lambda p: USGM(p, radius=5.0)])
def test_step_size_methods_train_in_the_trainer(make, tmp_path):
    data = noisy_data()
    m = model()
    result = fit(m, data, config(epochs=2, gradient_groups=1), optimizer=make(m.parameters()),
                 checkpoint_dir=tmp_path, progress=False)
    sizes = [s["step_size"] for s in result.steps]
    assert all(np.isfinite(sizes)) and len(set(sizes)) > 1, "the step size adapts"
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] + 0.5
