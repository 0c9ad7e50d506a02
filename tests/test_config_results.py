"""Presets, parameter validation and the results contract."""

import json
from dataclasses import dataclass

import pandas as pd
import pytest

from paperlib.config import EXPLICIT, ConfigError, StudyParams, configure, load_preset, merge, parameters_source
from paperlib.fields import param
from paperlib.results import (
    ResultsError, load_results, markdown_table, results_path, save_figure, save_results, save_table,
)


@dataclass
class DemoParams(StudyParams):
    seeds: list[int] = param([1], "seeds", min=0)
    lr: float = param(0.1, "learning rate", min=0.0)
    epochs: int = param(20, "maximum epochs", min=1)
    name: str = param("x", "a name", choices=("x", "y"))


@pytest.fixture
def demo_presets(tmp_path, monkeypatch):
    """A notebooks folder with presets for a notebook called 99_demo."""
    folder = tmp_path / "notebooks" / "presets"
    (folder / "smoke").mkdir(parents=True)
    (folder / "smoke" / "99_demo.yaml").write_text("preset: smoke\nepochs: 2\nseeds: [7]\n")
    monkeypatch.setenv("PAPERLIB_NOTEBOOKS", str(tmp_path / "notebooks"))
    return folder


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'tiny'.*smoke, quick, paper"):
        load_preset("tiny", "01_datasets")


def test_merge_defaults_preset_overrides(demo_presets):
    cfg = merge(DemoParams, "99_demo", "smoke", {"lr": 1})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert (cfg.epochs, cfg.seeds, cfg.preset) == (2, [7], "smoke")
    assert merge(DemoParams, "99_demo", "quick").epochs == 20  # no file: the defaults


def test_configure_applies_the_preset_to_values_left_at_their_default(demo_presets):
    cell = {"preset": "smoke", "recompute": False, "output_dir": "", "seeds": [1], "lr": 0.5, "epochs": 20,
            "name": "x"}
    cfg = configure(DemoParams, "99_demo", cell)
    assert (cfg.epochs, cfg.seeds, cfg.lr) == (2, [7], 0.5)  # changed in the cell: kept
    # a value set explicitly on the command line wins even when it equals the default
    cfg = configure(DemoParams, "99_demo", {**cell, EXPLICIT: ["epochs"]})
    assert cfg.epochs == 20 and cfg.seeds == [7]


def test_parameters_are_rejected_before_anything_runs(demo_presets):
    with pytest.raises(ConfigError, match="unknown parameter.*'epochz'"):
        merge(DemoParams, "99_demo", "smoke", {"epochz": 3})
    with pytest.raises(ConfigError, match="'lr' must be float, got str"):
        merge(DemoParams, "99_demo", "smoke", {"lr": "0.1"})
    with pytest.raises(ConfigError, match="'seeds\\[1\\]' must be int"):
        merge(DemoParams, "99_demo", "smoke", {"seeds": [1, "2"]})
    with pytest.raises(ConfigError, match="'recompute' must be bool"):
        configure(DemoParams, "99_demo", {"recompute": 1})
    with pytest.raises(ConfigError, match="'epochs' must be >= 1, got 0"):
        merge(DemoParams, "99_demo", "smoke", {"epochs": 0})
    with pytest.raises(ConfigError, match="'name' must be one of \\['x', 'y'\\], got 'z'"):
        merge(DemoParams, "99_demo", "smoke", {"name": "z"})
    (demo_presets / "smoke" / "99_demo.yaml").write_text("preset: smoke\nepocs: 2\n")
    with pytest.raises(ConfigError, match="preset 'smoke'.*unknown parameter.*'epocs'"):
        merge(DemoParams, "99_demo", "smoke")


def test_parameters_cell_is_written_from_the_definitions():
    src = parameters_source(DemoParams)
    assert src.splitlines()[3:] == [
        "seeds: list[int] = [1]  # seeds",
        "lr: float = 0.1  # learning rate",
        "epochs: int = 20  # maximum epochs",
        'name: str = "x"  # a name',
    ]

    @dataclass
    class Bad(StudyParams):
        spec: str = param("a=b", "papermill would skip this line")

    with pytest.raises(ConfigError, match="may not contain '=' or '#'"):
        parameters_source(Bad)


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
    assert StudyParams(preset="quick").figure_dir == str(paths.figures_dir())
    assert StudyParams(preset="paper").figure_dir == str(tmp_path / "paper")
    assert StudyParams(preset="smoke", output_dir="/x").figure_dir == "/x"
