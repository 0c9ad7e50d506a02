"""Hygiene of the committed notebooks, presets and environment files (PITFALLS #1–5, #12, #18)."""

import ast
import re
import tomllib

import nbformat
import papermill as pm
import pytest
import yaml
from jupyter_client.kernelspec import KernelSpecManager

from paperlib import paths
from paperlib.config import PRESETS, load_preset
from paperlib.notebooks import COMMITTED_PRESET, NOTEBOOKS
from paperlib.results import results_path

from conftest import REPO

NB = list(NOTEBOOKS.values())


def test_every_notebook_file_is_registered():
    on_disk = {p.stem for p in paths.notebooks_dir().glob("*.ipynb")}
    assert on_disk == set(NOTEBOOKS)


@pytest.mark.parametrize("nb", NB, ids=lambda n: n.name)
def test_parameters_cell(nb):
    book = nbformat.read(nb.path, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert code[1] is tagged[0], "code cell 2 is the parameters cell (cell 1 imports)"
    assert all(line.startswith(("from ", "import ")) or not line.strip() for line in code[0].source.splitlines())
    # typed literals only (PITFALLS #3-4)
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.Assign), f"only assignments in the parameters cell: {ast.unparse(node)}"
        ast.literal_eval(node.value)
    declared = pm.inspect_notebook(str(nb.path))
    assert {"preset", "recompute", "output_dir"} <= set(declared)
    assert declared["recompute"]["default"] == "False"
    assert declared["preset"]["default"] == repr(COMMITTED_PRESET).replace("'", '"')


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_keys_are_declared_parameters(preset):
    data = load_preset(preset)
    assert set(data) <= set(NOTEBOOKS), f"preset sections must name notebooks: {set(data) - set(NOTEBOOKS)}"
    for name, section in data.items():
        declared = pm.inspect_notebook(str(NOTEBOOKS[name].path))
        assert set(section) <= set(declared), f"{preset}/{name}: {set(section) - set(declared)} not declared"


@pytest.mark.parametrize("nb", NB, ids=lambda n: n.name)
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
    assert results_path(nb.study, COMMITTED_PRESET).exists(), "the results it renders are committed"


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
