"""Papermill smoke runs of every notebook in compute mode (preset ``smoke``), asserting on the
results JSON they write (DESIGN §7, PITFALLS #1, #2, #6, #9)."""

import json
import time

import pytest

from paperlib.config import ConfigError, load_preset
from paperlib.notebooks import execute
from paperlib.studies import studies

pytestmark = pytest.mark.slow

#: a smoke run must stay small: seconds to a minute (PITFALLS #9)
SMOKE_BUDGET_S = 180


@pytest.mark.parametrize("study", list(studies().values()), ids=lambda s: s.notebook)
def test_smoke_run(study, real_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLIB_BUILD", str(tmp_path / "build"))
    t0 = time.perf_counter()
    executed = execute(study.notebook, "smoke", output_dir=tmp_path / "out", progress=False)
    elapsed = time.perf_counter() - t0
    assert executed.exists()
    doc = json.loads((tmp_path / "out" / "results" / f"{study.name}.smoke.json").read_text())
    assert doc["preset"] == "smoke" and doc["params"]["recompute"] is True
    assert doc["provenance"]["wall_seconds"] > 0
    # the preset's values reached the study
    for name, value in load_preset("smoke", study.notebook).items():
        assert doc["params"][name] == value, name
    for stem in study.produces:
        assert list((tmp_path / "out").glob(f"{stem}.*")), f"{stem} was not written"
    if study.check is not None:
        study.check(doc)
    assert elapsed < SMOKE_BUDGET_S, f"smoke run took {elapsed:.0f} s"


def test_unknown_parameter_fails_before_running(tmp_path):
    with pytest.raises(ConfigError, match="unknown parameter.*datasetz"):
        execute("01_datasets", "smoke", {"datasetz": ["ml-100k"]}, output_dir=tmp_path)


def test_unknown_notebook_and_preset(tmp_path):
    with pytest.raises(ConfigError, match="unknown notebook 'nope'"):
        execute("nope", "smoke")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        execute("01_datasets", "huge")


def test_wrong_type_fails_before_running(real_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLIB_BUILD", str(tmp_path / "build"))
    with pytest.raises(ConfigError, match="'k_core' must be int, got str"):
        execute("01_datasets", "smoke", {"k_core": "five"}, output_dir=tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="'k_core' must be >= 1, got 0"):
        execute("01_datasets", "smoke", {"k_core": 0}, output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "build").exists()


def test_the_notebook_validates_its_own_cell(real_data, tmp_path, monkeypatch):
    """Run in JupyterLab, the notebook itself refuses a wrongly typed value before computing."""
    import nbformat
    import papermill as pm

    study = studies()["01_datasets"]
    nb = nbformat.read(study.path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source = cell.source.replace("k_core: int = 5", 'k_core: int = "five"')
    path = tmp_path / "edited.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(pm.PapermillExecutionError, match="'k_core' must be int, got str"):
        pm.execute_notebook(str(path), str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
                            cwd=str(tmp_path))
