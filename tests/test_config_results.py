"""Presets, parameter validation and the results contract."""

import json
from dataclasses import dataclass, field

import pandas as pd
import pytest

from paperlib.config import ConfigError, NotebookParams, load_preset, resolve
from paperlib.results import (
    ResultsError, load_results, markdown_table, results_path, save_figure, save_results, save_table,
)


@dataclass
class DemoParams(NotebookParams):
    seeds: list[int] = field(default_factory=lambda: [1])
    lr: float = 0.1
    name: str = "x"


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'tiny'.*smoke, quick, paper"):
        load_preset("tiny")


def test_resolve_types_and_defaults():
    cfg = resolve(DemoParams, "demo", preset="smoke", recompute=True, seeds=None, lr=1)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.seeds == [1] and cfg.recompute is True and cfg.preset == "smoke"


def test_resolve_rejects_unknown_and_wrong_types():
    with pytest.raises(ConfigError, match="unknown parameter.*'epochz'"):
        resolve(DemoParams, "demo", preset="smoke", epochz=3)
    with pytest.raises(ConfigError, match="'lr' must be float, got str"):
        resolve(DemoParams, "demo", preset="smoke", lr="0.1")
    with pytest.raises(ConfigError, match="'seeds' must be list"):
        resolve(DemoParams, "demo", preset="smoke", seeds=[1, "2"])
    with pytest.raises(ConfigError, match="'recompute' must be bool"):
        resolve(DemoParams, "demo", preset="smoke", recompute=1)


def test_results_roundtrip_and_provenance(tmp_path):
    path = save_results("demo", "smoke", {"a": 1}, {"m": [0.5]}, output_dir=tmp_path, wall_seconds=1.5)
    assert path == results_path("demo", "smoke", tmp_path)
    doc = load_results("demo", "smoke", tmp_path)
    assert doc["results"] == {"m": [0.5]} and doc["params"] == {"a": 1}
    prov = doc["provenance"]
    assert prov["wall_seconds"] == 1.5 and prov["versions"]["torch"] and "cpu_count" in prov["device"]


def test_failed_save_keeps_previous_results(tmp_path):
    save_results("demo", "smoke", {}, {"v": 1}, output_dir=tmp_path)
    with pytest.raises(TypeError):
        save_results("demo", "smoke", {}, {"v": object()}, output_dir=tmp_path)
    assert load_results("demo", "smoke", tmp_path)["results"] == {"v": 1}
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["demo.smoke.json"]


def test_missing_results_says_how_to_compute(tmp_path):
    with pytest.raises(ResultsError, match="paperlib run"):
        load_results("demo", "quick", tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "demo.quick.json").write_text("{oops")
    with pytest.raises(ResultsError, match="not valid JSON"):
        load_results("demo", "quick", tmp_path)


def test_tables_and_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame({"hr@10": [0.31, 0.29]}, index=pd.Index(["Mamba4Rec", "SASRec"], name="model"))
    files = save_table(df, "t", tmp_path, caption="cap")
    assert sorted(p.suffix for p in files) == [".csv", ".md", ".tex"]
    assert "| Mamba4Rec | 0.31  |" in (tmp_path / "t.md").read_text()
    assert pd.read_csv(tmp_path / "t.csv", index_col=0).loc["SASRec", "hr@10"] == 0.29
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    save_figure(fig, "f", tmp_path)
    first = (tmp_path / "f.pdf").read_bytes()
    save_figure(fig, "f", tmp_path)
    assert (tmp_path / "f.pdf").read_bytes() == first  # no creation date: reproducible (PITFALLS #19)
    assert (tmp_path / "f.png").stat().st_size > 0
    plt.close(fig)


def test_markdown_table_plain_index():
    assert markdown_table(pd.DataFrame({"a": [1]})).splitlines()[0] == "| a |"


def test_figure_dir_keeps_committed_figures(monkeypatch, tmp_path):
    from paperlib import paths

    monkeypatch.setenv("PAPERLIB_FIGURES", str(tmp_path))
    assert NotebookParams(preset="quick").figure_dir == str(paths.figures_dir())
    assert NotebookParams(preset="paper").figure_dir == str(tmp_path / "paper")
    assert NotebookParams(preset="smoke", output_dir="/x").figure_dir == "/x"
