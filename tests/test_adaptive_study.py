"""The adaptive-training study (05): its smoke compute against its own results check, resume,
time to target on hand-made histories, Table 5's sentence, run names and bad parameters."""

from __future__ import annotations

import logging
import math

import pytest

from paperlib import paths

from paperlib.config import merge
from paperlib.fields import ConfigError
from paperlib.studies import adaptive as study
from paperlib.studies.adaptive import AdaptiveParams, RunSpec, parse_run, time_to_target

NOTEBOOK = "05_adaptive"


def smoke(tmp_path, **overrides) -> AdaptiveParams:
    return merge(AdaptiveParams, NOTEBOOK, "smoke", {"output_dir": str(tmp_path / "out"), "recompute": True,
                                                      **overrides})


@pytest.fixture
def build(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLIB_BUILD", str(tmp_path / "build"))
    return tmp_path / "build"


# --- the smoke compute ---------------------------------------------------------------------------

def test_smoke_compute_satisfies_the_check_and_resumes(real_data, tmp_path, build, capsys):
    cfg = smoke(tmp_path, resume=True)
    doc = study.compute(cfg, progress=False)
    study.check_results(doc)
    runs = doc["results"]["runs"]
    assert [r["run"] for r in runs] == cfg.runs
    # every run spends the same budget of pairs and is validated at least twice
    assert all(r["examples"] >= doc["results"]["dataset"]["budget"] and len(r["history"]) >= 2 for r in runs)
    # fixed runs keep their batch; each adaptive run records a test for every step it could split
    for r in runs:
        if parse_run(r["run"]).adaptive_batch:
            assert 0 < r["batch_tests"]["tested"] <= r["n_steps"]
        else:
            assert {s["budget"] for s in r["steps"]} == {cfg.batch_size}
    # thinned to max_step_records (6) plus the steps where the batch changed
    assert any(len(r["steps"]) < r["n_steps"] for r in runs)
    # the figures, tables and sentence draw from the JSON alone
    assert len(study.table5(doc)) == len(cfg.runs)
    assert "Target: validation NDCG@10" in study.summary(doc)
    study.figure6(doc), study.figure7(doc)
    # a second compute with the same settings reuses every finished run
    again = study.compute(cfg, progress=True)
    assert capsys.readouterr().out.count("reused, not retrained") == len(cfg.runs)
    assert again["results"]["runs"] == runs
    assert list(paths.checkpoints_dir().glob("adaptive/smoke/ml-100k/*/1/last.pt"))


def test_a_diverging_run_is_recorded_and_the_others_go_on(real_data, tmp_path, build, caplog):
    """A NaN loss stops that run with a message naming the step; a batch the test wants beyond
    max_batch is capped and logged."""
    cfg = smoke(tmp_path, runs=["adam", "adam+norm", "adagrad_norm"], alpha=1e6, max_batch=300)
    with caplog.at_level(logging.INFO, logger="paperlib.adaptive"):
        doc = study.compute(cfg, progress=False)
    study.check_results(doc)
    adam, norm, adagrad = doc["results"]["runs"]
    assert adagrad["diverged"] and "step" in adagrad["diverged"] and adagrad["test"] is None
    assert adam["diverged"] is None and adam["test"] is not None
    assert norm["batch_tests"]["capped"] > 0 and norm["final_budget"] == 300
    assert "capped at max_batch=300" in caplog.text
    assert "Stopped on a NaN or infinite loss: AdaGrad-Norm" in study.summary(doc)


def test_batch_sizes_the_data_cannot_take_fail_before_training(real_data, tmp_path, build):
    with pytest.raises(ConfigError, match="'initial_batch' 100 is smaller than the 200 targets of one training window"):
        study.compute(smoke(tmp_path, initial_batch=100), progress=False)
    with pytest.raises(ConfigError, match="'batch_size' 99,999 is larger than a pass"):
        study.compute(smoke(tmp_path, batch_size=99_999), progress=False)
    assert not build.exists() and not (tmp_path / "out").exists()


# --- time to target ------------------------------------------------------------------------------

def entry(pairs: int, seconds: float, ndcg: float, epoch: int) -> dict:
    return {"epoch": epoch, "pairs": pairs, "train_seconds": seconds, "valid": {"ndcg@10": ndcg}}


HISTORY = [entry(100, 2.0, 0.01, 1), entry(100, 3.0, 0.05, 2), entry(150, 1.5, 0.08, 3), entry(100, 2.0, 0.07, 4)]


def test_time_to_target_is_the_first_validation_at_or_above_it():
    # cumulative: examples 100, 200, 350, 450; seconds 2, 5, 6.5, 8.5
    assert time_to_target(HISTORY, 0.05) == {"seconds": 5.0, "examples": 200, "validation": 2}
    assert time_to_target(HISTORY, 0.06) == {"seconds": 6.5, "examples": 350, "validation": 3}
    assert time_to_target(HISTORY, 0.001) == {"seconds": 2.0, "examples": 100, "validation": 1}
    assert time_to_target(HISTORY, 0.0801) is None
    assert time_to_target([], 0.01) is None


def run_entry(name: str, history: list[dict], **kw) -> dict:
    spec = parse_run(name)
    return {"run": name, "label": spec.label, "seed": 1, "history": history, "test": {"ndcg@10": 0.05},
            "diverged": None, "train_seconds": sum(h["train_seconds"] for h in history),
            "examples": sum(h["pairs"] for h in history), "n_steps": 10, "final_budget": 512, **kw}


def doc_of(*runs: dict) -> dict:
    return {"params": {"baseline": "adam"}, "results": {"runs": list(runs)}}


def test_table5_and_its_sentence_on_hand_made_runs():
    # the baseline's best is 0.08: target 0.076, reached at its 3rd validation (6.5 s, 350 examples)
    fast_in_time = run_entry("adam+norm", [entry(300, 1.0, 0.02, 1), entry(300, 1.0, 0.09, 2)])  # 2 s, 600 ex.
    never = run_entry("usgm", [entry(450, 4.0, 0.03, 1)])
    doc = doc_of(run_entry("adam", HISTORY), fast_in_time, never)
    assert study.target(doc)["value"] == pytest.approx(0.95 * 0.08)
    table = study.table5_numeric(doc)
    assert table.loc["adam", "seconds_to_target"] == 6.5 and table.loc["adam", "examples_to_target"] == 350
    assert table.loc["adam+norm", "time_vs_baseline"] == pytest.approx(2.0 / 6.5)
    assert table.loc["adam+norm", "examples_vs_baseline"] == pytest.approx(600 / 350)
    assert table.loc["usgm", "reached"] == 0 and math.isnan(table.loc["usgm", "seconds_to_target"])
    text = study.summary(doc)
    assert "Adam + norm test reached the target soonest, after 2.0 s against the baseline's 6.5 s (69 % less)" in text
    assert ("no other configuration reached the target sooner than the baseline; the nearest, Adam + norm test, "
            "took 600 examples (1.71 × the baseline's 350 examples)") in text
    assert "Never reached the target within the budget: USGM." in text
    assert study.table5(doc).loc["USGM", "time to target (s)"] == "—"


def test_the_sentence_when_nothing_beats_the_baseline():
    slow = run_entry("adagrad_norm+inner_product", [entry(400, 9.0, 0.079, 1)])
    text = study.summary(doc_of(run_entry("adam", HISTORY), slow))
    assert "In training time**: no other configuration reached the target sooner than the baseline; the nearest, " \
           "AdaGrad-Norm + inner-product test (AdaBatchGrad), took 9.0 s (1.38 × the baseline's 6.5 s)" in text


# --- run names and parameters --------------------------------------------------------------------

def test_run_names_parse_into_optimizer_and_test():
    assert parse_run("adam") == RunSpec("adam", None)
    assert parse_run("adagrad_norm+inner_product") == RunSpec("adagrad_norm", "inner_product")
    assert parse_run(" usgm + augmented ") == RunSpec("usgm", "augmented")
    assert parse_run("usgm+orthogonality").name == "usgm+orthogonality"
    assert parse_run("adagrad_norm+inner_product").label == "AdaGrad-Norm + inner-product test (AdaBatchGrad)"
    assert not parse_run("usgm").adaptive_batch and parse_run("adam+norm").adaptive_batch


@pytest.mark.parametrize("name, message", [
    ("sgd", "unknown optimizer 'sgd' in run 'sgd'"),
    ("adam+variance", "unknown batch-size test 'variance' in run 'adam\\+variance'"),
    ("adam+", "unknown batch-size test '' in run 'adam\\+'"),
    ("Adam+norm", "unknown optimizer 'Adam'"),
])
def test_unknown_run_names_are_refused(name, message):
    with pytest.raises(ConfigError, match=message):
        parse_run(name)
    with pytest.raises(ConfigError, match=message):
        AdaptiveParams(runs=["adam", name])


@pytest.mark.parametrize("name", ["theta", "nu", "radius", "alpha", "beta"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_step_and_test_settings_must_be_positive(name, value):
    with pytest.raises(ConfigError, match=f"'{name}' must be a positive finite number, got {value}"):
        AdaptiveParams(**{name: value})


def test_other_bad_parameters():
    with pytest.raises(ConfigError, match="'baseline' 'usgm' is not one of the runs"):
        AdaptiveParams(runs=["adam", "adam+norm"], baseline="usgm")
    with pytest.raises(ConfigError, match=r"'runs' names \['adam'\] more than once"):
        AdaptiveParams(runs=["adam", "adam+norm", "adam"])
    with pytest.raises(ConfigError, match="'max_batch' \\(300\\) is below 'initial_batch' \\(512\\)"):
        AdaptiveParams(max_batch=300)
    with pytest.raises(ConfigError, match="'gradient_groups' must be >= 2, got 1"):
        AdaptiveParams(gradient_groups=1)
    with pytest.raises(ConfigError, match="'theta' must be float, got str"):
        merge(AdaptiveParams, NOTEBOOK, "quick", {"theta": "0.9"})
    with pytest.raises(ConfigError, match="unknown parameter.*'thetta'"):
        merge(AdaptiveParams, NOTEBOOK, "quick", {"thetta": 0.9})


def test_thinning_keeps_the_ends_and_the_changes():
    assert study.thin(5, 10) == [0, 1, 2, 3, 4]
    kept = study.thin(1000, 10, keep=[500, 501])
    assert kept[0] == 0 and kept[-1] == 999 and {500, 501} <= set(kept) and len(kept) == 12
    assert study._changes([5, 5, 7, 7, 9]) == [2, 4]
