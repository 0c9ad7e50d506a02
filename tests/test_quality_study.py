"""The quality study's own logic: finished runs are reused, the published comparison and the
generated text come from the results."""

from __future__ import annotations

import pytest

from paperlib.config import merge
from paperlib.studies import quality


@pytest.fixture
def tiny_cfg(real_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLIB_BUILD", str(tmp_path / "build"))
    return merge(quality.QualityParams, "02_quality", "smoke", {
        "output_dir": str(tmp_path / "out"), "models": ["gru4rec"], "epochs": 1, "resume": True})


def test_a_finished_run_is_reused_not_retrained(tiny_cfg, monkeypatch):
    first = quality.compute(tiny_cfg, progress=False)
    (run,) = first["results"]["runs"]
    assert run["key"] and len(run["history"]) == 1

    import paperlib.train as train_mod

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_mod, "fit", no_training)
    second = quality.compute(tiny_cfg, progress=False)
    assert second["results"]["runs"] == first["results"]["runs"]
    # other settings are another run: it trains
    with pytest.raises(AssertionError, match="trained again"):
        quality.compute(merge(quality.QualityParams, "02_quality", "smoke",
                              {**{k: getattr(tiny_cfg, k) for k in ("output_dir", "models", "epochs")}, "lr": 0.002}),
                        progress=False)


def test_model_specs():
    assert quality.parse_model_spec("mamba4rec{n_layers: 2, dropout: 0.4}") == ("mamba4rec", {"n_layers": 2, "dropout": 0.4})
    assert quality.parse_model_spec("sasrec") == ("sasrec", {})
    assert quality.run_label("mamba4rec{n_layers: 2}") == "Mamba4Rec (n_layers=2)"
    from paperlib.fields import ConfigError

    with pytest.raises(ConfigError, match="unknown model 'mamba'"):
        quality.parse_model_spec("mamba{n_layers: 2}")
    with pytest.raises(ConfigError, match="must be a mapping"):
        quality.parse_model_spec("mamba4rec{[1, 2]}")
    with pytest.raises(ConfigError, match="'n_layers' must be int, got NoneType"):
        quality.parse_model_spec("mamba4rec{n_layers}")
    with pytest.raises(ConfigError, match="unknown option.*'n_layer'"):
        quality.parse_model_spec("mamba4rec{n_layer: 2}")


def test_summary_states_the_ranking_and_every_gap():
    def run(dataset, label, ndcg, hr, epochs=3, removed=None):
        return {"dataset": dataset, "model": label.lower(), "label": label, "seed": 1, "best_epoch": epochs,
                "history": [{"seconds": 1.0, "valid": {"ndcg@10": 0.1}}] * epochs,
                "test": {"hr@10": hr, "ndcg@10": ndcg, "mrr@10": ndcg / 2},
                "test_seen_removed": {"hr@10": hr + 0.1, "ndcg@10": removed or ndcg, "mrr@10": ndcg}}

    doc = {"preset": "quick", "results": {"runs": [run("ml-1m", "SASRec", 0.10, 0.2, removed=0.15),
                                                   run("ml-1m", "Mamba4Rec", 0.12, 0.25)]}}
    text = quality.summary(doc)
    assert "Mamba4Rec 0.1200 > SASRec 0.1000" in text
    # 0.12 / 0.1822 - 1 = -34.1 %; SASRec with seen items removed 0.15 / 0.1821 - 1 = -17.6 %
    assert "ml-1m Mamba4Rec NDCG@10 (recbole protocol): ours (quick) 0.1200 vs published 0.1822 (-34.1 %)" in text
    assert "ml-1m SASRec NDCG@10 (seen removed protocol): ours (quick) 0.1500 vs published 0.1821 (-17.6 %)" in text
