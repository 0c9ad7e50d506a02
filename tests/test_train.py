"""Tests of the training loop on a small synthetic dataset with learnable structure (each user walks
the catalogue in a cycle: the next item is always the current one + 1)."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import paperlib.train as train_mod
from paperlib.data.sequences import SequentialData, count_pairs, train_batches
from paperlib.metrics import METRIC_NAMES
from paperlib.models import build_model
from paperlib.models.base import ModelConfig, SequentialRecommender
from paperlib.train import TrainConfig, TrainingDivergedError, evaluate, fit, load_checkpoint

N_ITEMS = 20
N_CYCLE = 15  # users walk items 1..15; items 16..20 are in the catalogue but never occur
MAX_LEN = 10
TINY = {
    "sasrec": {"hidden_size": 16, "inner_size": 32, "n_layers": 1},
    "bert4rec": {"hidden_size": 16, "inner_size": 32, "n_layers": 1},
    "gru4rec": {"hidden_size": 16, "gru_hidden_size": 16},
    "mamba4rec": {"hidden_size": 16},
}


def cycle_data(n_users: int = 96, seed: int = 0) -> SequentialData:
    """Synthetic data for unit tests only: user u starts at a random item and steps +1 around a
    cycle of the first N_CYCLE items (a signal every model picks up within an epoch: the unused
    items; and one that takes longer: the successor)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        start, length = int(rng.integers(0, N_CYCLE)), int(rng.integers(6, 14))
        seqs.append(np.array([(start + t) % N_CYCLE + 1 for t in range(length)], dtype=np.int64))
    return SequentialData(name="cycle", sequences=seqs, n_items=N_ITEMS, max_len=MAX_LEN)


def tiny(name: str, seed: int = 0, **extra) -> SequentialRecommender:
    torch.manual_seed(seed)
    return build_model(name, n_items=N_ITEMS, max_len=MAX_LEN, **{**TINY[name], **extra})


def quick(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=32, eval_batch_size=64, lr=5e-3, device="cpu", patience=10)
    return TrainConfig(**{**base, **kw})


ALL = ["gru4rec", "sasrec", "bert4rec", "mamba4rec"]


def fixed_loss(model: SequentialRecommender, data: SequentialData) -> float:
    """Loss on every training sequence without dropout (and fixed BERT4Rec masks)."""
    model.eval()
    torch.manual_seed(7)
    with torch.no_grad():
        return model.loss(next(train_batches(data, batch_size=None, shuffle=False))).item()


# --------------------------------------------------------------------------- learning
@pytest.mark.parametrize("name", ALL)
def test_one_epoch_lowers_the_loss(name):
    data = cycle_data()
    model = tiny(name)
    before = fixed_loss(model, data)
    result = fit(model, data, quick(epochs=1, batch_size=24, lr=1e-2), progress=False)
    after = fixed_loss(model, data)
    assert after < before - 0.1, (before, after)
    (epoch,) = result.history
    assert epoch["epoch"] == 1 and math.isfinite(epoch["train_loss"])
    # every RecBole pair once, in batches of at most 24 pairs (whole windows)
    assert epoch["pairs"] == count_pairs(data) == result.pairs_per_epoch
    assert math.ceil(count_pairs(data) / 24) <= epoch["steps"] <= math.ceil(count_pairs(data) / (24 - MAX_LEN))
    assert set(result.test) == {f"{m}@{k}" for m in METRIC_NAMES for k in (5, 10, 20)}
    assert result.best_epoch == 1 and result.model_name == name and result.device == "cpu"


def test_training_is_deterministic():
    data = cycle_data()
    runs = [fit(tiny("sasrec"), data, quick(epochs=2), progress=False) for _ in range(2)]
    strip = lambda h: [{k: v for k, v in e.items() if "seconds" not in k} for e in h]  # noqa: E731
    assert strip(runs[0].history) == strip(runs[1].history)
    assert runs[0].test == runs[1].test


# --------------------------------------------------------------------------- evaluation
class LastItemScorer(SequentialRecommender):
    """Scores read from a fixed table by the last item of the history (for hand computation)."""

    name = "table"

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.config = ModelConfig(n_items=table.shape[1] - 1, max_len=5)
        self.table = table
        self.unused = nn.Parameter(torch.zeros(1))

    def score(self, items, lengths):
        scores = self.table[items[torch.arange(items.shape[0]), lengths - 1]].clone()
        scores[:, 0] = float("-inf")
        return scores


def test_evaluate_matches_a_hand_computation():
    nan = float("nan")
    table = torch.tensor([
        [nan, 0.0, 0.0, 0.0, 0.0],
        [nan, 0.1, 0.4, 0.1, 0.3],  # after item 1
        [nan, 0.1, 0.2, 0.9, 0.5],  # after item 2
        [nan, 0.3, 0.8, 0.1, 0.6],  # after item 3
        [nan, 0.0, 0.0, 0.0, 0.0],
    ])
    data = SequentialData(
        name="hand", n_items=4, max_len=5,
        sequences=[np.array(s) for s in ([1, 2, 3, 4], [4, 1, 3, 2], [3, 3, 2, 1])],
    )
    # valid: (hist ..2 → 3: rank 1), (..1 → 3: 0.1 ties with item 1, counted against: rank 4),
    #        (..3 → 2: rank 1);  test: (..3 → 4: rank 2), (..3 → 2: rank 1), (..2 → 1: rank 4)
    valid = evaluate(LastItemScorer(table), data, "valid", batch_size=2, ks=(2, 5))
    test = evaluate(LastItemScorer(table), data, "test", batch_size=2, ks=(2, 5))
    expected_valid = {
        "hr@2": 2 / 3, "ndcg@2": 2 / 3, "mrr@2": 2 / 3,
        "hr@5": 1.0, "ndcg@5": (1 + 1 / math.log2(5) + 1) / 3, "mrr@5": (1 + 1 / 4 + 1) / 3,
    }
    expected_test = {
        "hr@2": 2 / 3, "ndcg@2": (1 / math.log2(3) + 1) / 3, "mrr@2": (1 / 2 + 1) / 3,
        "hr@5": 1.0, "ndcg@5": (1 / math.log2(3) + 1 + 1 / math.log2(5)) / 3, "mrr@5": (1 / 2 + 1 + 1 / 4) / 3,
    }
    assert valid == pytest.approx(expected_valid)
    assert test == pytest.approx(expected_test)


def test_evaluate_restores_the_training_mode_and_checks_the_catalogue():
    data = cycle_data(n_users=8)
    model = tiny("sasrec").train()
    evaluate(model, data, "valid")
    assert model.training
    with pytest.raises(ValueError, match="built for 30 items"):
        evaluate(build_model("sasrec", n_items=30, max_len=MAX_LEN), data, "valid")
    with pytest.raises(ValueError, match="unknown split"):
        evaluate(model, data, "train")


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_resume_gives_identical_weights(tmp_path, name):
    data = cycle_data()
    cfg = quick(epochs=3)
    straight = tiny(name)
    r_straight = fit(straight, data, cfg, checkpoint_dir=tmp_path / "a", progress=False)

    fit(tiny(name), data, replace(cfg, epochs=2), checkpoint_dir=tmp_path / "b", progress=False)
    resumed = tiny(name, seed=99)  # another init: everything must come from the checkpoint
    r_resumed = fit(resumed, data, cfg, checkpoint_dir=tmp_path / "b", resume=True, progress=False)

    last_a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    last_b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert last_a["epoch"] == last_b["epoch"] == 3
    for key, value in last_a["model_state"].items():
        assert torch.equal(value, last_b["model_state"][key]), key
    for key, value in straight.state_dict().items():  # the restored best weights agree too
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert [e["train_loss"] for e in r_straight.history] == [e["train_loss"] for e in r_resumed.history]
    assert r_straight.test == r_resumed.test and r_straight.best_epoch == r_resumed.best_epoch


def test_checkpoints_are_weights_only_and_reload(tmp_path):
    data = cycle_data()
    model = tiny("gru4rec")
    result = fit(model, data, quick(epochs=2), checkpoint_dir=tmp_path, progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {"last.pt", "best.pt"}
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    for key in ("model_state", "optimizer_state", "rng", "epoch", "history", "best_state", "stopping",
                "model_config", "model_name", "train_config", "callbacks", "examples", "loader"):
        assert key in last, key
    assert last["model_name"] == "gru4rec" and last["model_config"]["gru_hidden_size"] == 16
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == result.best_epoch
    loaded = load_checkpoint(tmp_path / "best.pt")
    assert isinstance(loaded, type(model)) and not loaded.training
    assert evaluate(loaded, data, "test") == result.test


def test_resume_refuses_another_model(tmp_path):
    data = cycle_data(n_users=16)
    fit(tiny("sasrec"), data, quick(), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="model config differs"):
        fit(tiny("sasrec", hidden_size=8, inner_size=16), data, quick(epochs=2), checkpoint_dir=tmp_path,
            resume=True, progress=False)
    with pytest.raises(ValueError, match="'sasrec' run"):
        fit(tiny("gru4rec"), data, quick(epochs=2), checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="needs a checkpoint_dir"):
        fit(tiny("sasrec"), data, quick(), resume=True, progress=False)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    data = cycle_data()  # 96 users, 653 pairs, batch 320 pairs: 3 steps per epoch
    model = tiny("sasrec")
    original, calls = model.loss, {"n": 0}

    def loss(batch):
        calls["n"] += 1
        out = original(batch)
        return out * float("nan") if calls["n"] == 5 else out  # epoch 2, step 2

    monkeypatch.setattr(model, "loss", loss)
    with pytest.raises(TrainingDivergedError, match=r"nan at epoch 2, step 2.*epoch 1 are kept"):
        fit(model, data, quick(epochs=3, batch_size=320), checkpoint_dir=tmp_path, progress=False)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and len(last["history"]) == 1
    assert all(torch.isfinite(v).all() for v in last["model_state"].values() if v.is_floating_point())
    assert not list(tmp_path.glob("*.tmp*"))


def test_early_stopping_restores_the_best_epoch(tmp_path, monkeypatch):
    data = cycle_data()
    real_evaluate = train_mod.evaluate
    # RecBole's rule: a tie counts as an improvement; stop after more than `patience` bad epochs
    scripted = [0.1, 0.3, 0.3, 0.2, 0.2, 0.9, 0.9]

    def fake_evaluate(model, data, split, batch_size=4096, ks=(5, 10, 20), device=None, exclude_seen=False):
        if split == "test":
            return real_evaluate(model, data, split, batch_size, ks, device, exclude_seen)
        value = scripted.pop(0)
        return {f"{m}@{k}": value for m in METRIC_NAMES for k in ks}

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    model = tiny("gru4rec")
    result = fit(model, data, quick(epochs=10, patience=1), checkpoint_dir=tmp_path, progress=False)
    assert [e["epoch"] for e in result.history] == [1, 2, 3, 4, 5]
    assert [e["improved"] for e in result.history] == [True, True, True, False, False]
    assert result.stopped_early and result.best_epoch == 3 and result.best_valid["ndcg@10"] == 0.3
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 3

    # the same run stopped after epoch 3 ends with the same weights
    scripted[:] = [0.1, 0.3, 0.3]
    reference = tiny("gru4rec")
    fit(reference, data, quick(epochs=3, patience=1), progress=False)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


# --------------------------------------------------------------------------- loop details
def test_one_log_line_per_epoch_and_step_cap(caplog):
    data = cycle_data()
    with caplog.at_level(logging.INFO, logger="paperlib.train"):
        result = fit(tiny("gru4rec"), data, quick(epochs=2, max_steps_per_epoch=2), progress=False)
    lines = [r.getMessage() for r in caplog.records if re.search(r"epoch \d+: loss", r.getMessage())]
    assert len(lines) == 2 and "valid ndcg@10" in lines[0] and "hr@10" in lines[0]
    assert [e["steps"] for e in result.history] == [2, 2]


def test_train_config_validation():
    assert TrainConfig().batch_size == 2048 and TrainConfig().eval_batch_size == 4096  # RecBole's, in pairs
    assert TrainConfig().lr == 1e-3 and TrainConfig().patience == 10 and TrainConfig().seed == 2020
    for bad in ({"epochs": 0}, {"batch_size": 1.5}, {"lr": 0}, {"valid_metric": "ndcg@50"},
                {"valid_metric": "auc@10"}, {"device": "tpu"}, {"max_steps_per_epoch": 0}, {"patience": -1}, {"seed": "1"}):
        with pytest.raises(ValueError, match="TrainConfig"):
            TrainConfig(**bad)


def test_fit_refuses_a_model_for_another_catalogue():
    data = cycle_data(n_users=8)
    with pytest.raises(ValueError, match="built for 30 items"):
        fit(build_model("gru4rec", n_items=30, max_len=MAX_LEN), data, quick(), progress=False)
    with pytest.raises(ValueError, match="max_len=5"):
        fit(build_model("sasrec", n_items=N_ITEMS, max_len=5), data, quick(), progress=False)


def test_progress_bar_switches(monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    from paperlib.runtime import progress_enabled

    assert progress_enabled(True) and not progress_enabled(False)
    fit(tiny("gru4rec"), cycle_data(n_users=16), quick(), progress=True)
    assert "gru4rec epoch 1" in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not progress_enabled(True)


def test_exclude_seen_removes_every_history_item_from_the_ranking():
    table = torch.tensor([
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.9, 0.4, 0.1, 0.3],  # after item 1
        [0.0, 0.1, 0.9, 0.8, 0.5],  # after item 2
        [0.0, 0.3, 0.8, 0.9, 0.6],  # after item 3
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ])
    data = SequentialData(name="hand", n_items=4, max_len=5,
                          sequences=[np.array(s) for s in ([1, 2, 3, 4], [4, 1, 2, 3], [3, 3, 2, 1])])
    # test histories ..3 → 4, ..2 → 3, ..2 → 1; seen items removed: user 0 has {1,2,3} removed,
    # so item 4 ranks first; user 1 {4,1,2}: 3 first; user 2 {3,2}: 4 (0.5) above 1 (0.1): rank 2
    removed = evaluate(LastItemScorer(table), data, "test", batch_size=2, ks=(1, 2), exclude_seen=True)
    assert removed["hr@1"] == pytest.approx(2 / 3) and removed["hr@2"] == pytest.approx(1.0)
    plain = evaluate(LastItemScorer(table), data, "test", batch_size=2, ks=(1, 2))
    # without removal: user 0: 4 (0.6) below 3 (0.9) and 2 (0.8): rank 3; user 1: 3 (0.8) below 2: 2;
    # user 2: 1 (0.1) is last of 4: rank 4
    assert plain["hr@1"] == 0.0 and plain["hr@2"] == pytest.approx(1 / 3)
