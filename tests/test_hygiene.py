"""Hygiene of the committed notebooks, presets and environment files (PITFALLS #1–5, #12, #18)."""

import ast
import dataclasses
import re
import tomllib

import nbformat
import papermill as pm
import pytest
import yaml
from jupyter_client.kernelspec import KernelSpecManager

from paperlib import paths
from paperlib.config import COMMITTED_PRESET, PRESETS, load_preset, parameters_source
from paperlib.results import results_path
from paperlib.studies import studies

from conftest import REPO

STUDIES = studies()
NB = list(STUDIES.values())


def test_every_notebook_file_is_registered():
    on_disk = {p.stem for p in paths.notebooks_dir().glob("*.ipynb")}
    assert on_disk == set(STUDIES)


@pytest.mark.parametrize("nb", NB, ids=lambda n: n.notebook)
def test_parameters_cell(nb):
    book = nbformat.read(nb.path, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert code[1] is tagged[0], "code cell 2 is the parameters cell (cell 1 imports)"
    assert all(line.startswith(("from ", "import ")) or not line.strip() for line in code[0].source.splitlines())
    # typed literals only (PITFALLS #3-4), written from the study's one parameter definition
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.AnnAssign), f"only annotated assignments: {ast.unparse(node)}"
        ast.literal_eval(node.value)
    assert tagged[0].source == parameters_source(nb.params), "re-render the notebook: its parameters cell is stale"
    # papermill documents every parameter with its type, default and help (--help-notebook)
    declared = pm.inspect_notebook(str(nb.path))
    fields = {f.name: f for f in dataclasses.fields(nb.params)}
    assert set(declared) == set(fields)
    for name, info in declared.items():
        assert info["help"] == fields[name].metadata["help"] and info["help"], name
        assert info["inferred_type_name"] != "None", name
    assert declared["recompute"]["default"] == "False"
    assert declared["preset"]["default"] == f'"{COMMITTED_PRESET}"'


def test_help_notebook_prints_every_parameter():
    import subprocess
    import sys

    nb = STUDIES["02_quality"]
    out = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(nb.path)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    for f in dataclasses.fields(nb.params):
        assert re.search(rf"^\s+{f.name}: \S.*\(default [^)]+\)\s+{re.escape(f.metadata['help'][:30])}", out, re.M), f.name


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("nb", NB, ids=lambda n: n.notebook)
def test_preset_files_are_papermill_parameter_files(preset, nb):
    values = load_preset(preset, nb.notebook)  # checks the file's own preset key
    declared = pm.inspect_notebook(str(nb.path))
    assert set(values) <= set(declared), f"{preset}/{nb.notebook}: {set(values) - set(declared)} not declared"
    nb.params(preset=preset, **values)  # every value has the declared type and range
    if preset == COMMITTED_PRESET:
        assert not values, "the notebook's defaults are the committed preset: its file sets nothing"
    folder = paths.presets_dir() / preset
    assert {p.stem for p in folder.glob("*.yaml")} <= set(STUDIES), "a preset file names no notebook"


@pytest.mark.parametrize("nb", NB, ids=lambda n: n.notebook)
def test_committed_in_render_mode(nb):
    book = nbformat.read(nb.path, as_version=4)
    assert book.metadata.kernelspec.name == "python3"
    KernelSpecManager().get_kernel_spec("python3")  # resolves (raises NoSuchKernel otherwise)
    assert "papermill" not in book.metadata
    for cell in book.cells:
        assert "injected-parameters" not in cell.metadata.get("tags", [])
        if cell.cell_type == "code":
            assert cell.execution_count is not None, "every code cell has been executed (PITFALLS #20)"
            for out in cell.outputs:
                assert out.get("name") != "stderr", f"stderr in committed outputs: {out.get('text', '')[:200]}"
                assert out.output_type != "error"
    counts = [c.execution_count for c in book.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), "executed top to bottom in one run"
    assert results_path(nb.name, COMMITTED_PRESET).exists(), "the results it renders are committed"


def _pins(reqs):
    return {re.split(r"[=<>\[ ]", r, maxsplit=1)[0].lower(): r.replace(" ", "") for r in reqs}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"] + project["optional-dependencies"]["llm"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pinned = [p for p in pip if not p.startswith("-e")]
    assert _pins(pinned) == _pins(deps)
    assert all("==" in d for d in deps), "direct dependencies are pinned exactly (PITFALLS #12)"
    assert "prefix" not in env
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])


def test_ci_calls_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    top = (REPO / "README.md").read_text().split("\n## ")[0]
    assert "make reproduce" in top and "make test" in top, "the two commands stand at the top of the README"


def test_no_dataset_files_tracked():
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    bad = [f for f in files if re.search(r"(ratings\.dat|movies\.dat|u\.data|u\.item|Beauty\.txt|Video\.txt|\.inter)(\.gz)?$", f)]
    assert not bad, f"dataset files must not be committed (terms): {bad}"
