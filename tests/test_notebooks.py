"""Papermill smoke runs of every notebook in compute mode (preset ``smoke``), asserting on the
results JSON they write (DESIGN §7, PITFALLS #1, #2, #6, #9)."""

import json
import time

import pytest

from paperlib.config import ConfigError
from paperlib.notebooks import NOTEBOOKS, execute

pytestmark = pytest.mark.slow

#: a smoke run must stay small: seconds to a minute (PITFALLS #9)
SMOKE_BUDGET_S = 180


def check_datasets(doc):
    ml = doc["results"]["datasets"]["ml-100k"]
    assert (ml["raw"]["users"], ml["raw"]["items"], ml["raw"]["interactions"]) == (943, 1682, 100_000)
    assert ml["kcore"]["interactions"] <= 100_000 and ml["kcore"]["users"] == 943
    assert sum(ml["raw"]["length_hist"]) == 943


def check_quality(doc):
    runs = doc["results"]["runs"]
    assert {r["model"] for r in runs} == {"gru4rec", "sasrec", "bert4rec", "mamba4rec"}
    for r in runs:
        assert len(r["history"]) == doc["params"]["epochs"] and r["dataset"] == "ml-100k"
        assert all(h["steps"] == doc["params"]["max_steps_per_epoch"] for h in r["history"])
        assert all(0.0 <= r["test"][f"{m}@10"] <= 1.0 for m in ("hr", "ndcg", "mrr"))
        assert r["test"]["ndcg@10"] <= r["test"]["hr@10"] and r["test"]["mrr@10"] <= r["test"]["ndcg@10"]
    assert doc["results"]["datasets"]["ml-100k"]["users"] == doc["params"]["max_users"]


CHECKS = {"datasets": check_datasets, "quality": check_quality}


@pytest.mark.parametrize("nb", list(NOTEBOOKS.values()), ids=lambda n: n.name)
def test_smoke_run(nb, real_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLIB_BUILD", str(tmp_path / "build"))
    t0 = time.perf_counter()
    executed = execute(nb.name, "smoke", output_dir=tmp_path / "out", progress=False)
    elapsed = time.perf_counter() - t0
    assert executed.exists()
    doc = json.loads((tmp_path / "out" / "results" / f"{nb.study}.smoke.json").read_text())
    assert doc["preset"] == "smoke" and doc["params"]["recompute"] is True
    assert doc["provenance"]["wall_seconds"] > 0
    for stem in nb.produces:
        assert list((tmp_path / "out").glob(f"{stem}.*")), f"{stem} was not written"
    CHECKS[nb.study](doc)
    assert elapsed < SMOKE_BUDGET_S, f"smoke run took {elapsed:.0f} s"


def test_unknown_parameter_fails_before_running(tmp_path):
    with pytest.raises(ConfigError, match="unknown parameter.*datasetz"):
        execute("01_datasets", "smoke", {"datasetz": ["ml-100k"]}, output_dir=tmp_path)


def test_unknown_notebook_and_preset(tmp_path):
    with pytest.raises(ConfigError, match="unknown notebook 'nope'"):
        execute("nope", "smoke")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        execute("01_datasets", "huge")


def test_wrong_type_fails_inside_notebook(real_data, tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.setenv("PAPERLIB_BUILD", str(tmp_path / "build"))
    with pytest.raises(pm.PapermillExecutionError, match="'k_core' must be int, got str"):
        execute("01_datasets", "smoke", {"k_core": "five"}, output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "results").exists()
