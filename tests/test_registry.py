"""The study registry: adding a study is a module, a notebook and preset entries, and nothing else.

A toy study is written to temporary folders (``$PAPERLIB_STUDY_PATH`` for its module,
``$PAPERLIB_NOTEBOOKS`` for a copy of the notebooks folder plus its notebook and preset), and then
``paperlib list``, ``paperlib reproduce`` and the smoke tests must pick it up as they are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from paperlib import paths

from conftest import REPO

pytestmark = pytest.mark.slow

TOY_MODULE = '''
"""A toy study: squares of the first n integers."""
import time
from dataclasses import dataclass

import pandas as pd

from paperlib import results
from paperlib.config import StudyParams
from paperlib.fields import param
from paperlib.studies import Study


@dataclass
class ToyParams(StudyParams):
    n: int = param(5, "how many squares", min=1)


def compute(cfg, progress=True):
    t0 = time.perf_counter()
    payload = {"squares": [i * i for i in range(cfg.n)]}
    results.save_results("toy", cfg.preset, cfg.to_dict(), payload, output_dir=cfg.output_dir,
                         wall_seconds=time.perf_counter() - t0)
    return STUDY.load(cfg)


def table(doc):
    return pd.DataFrame({"square": doc["results"]["squares"]})


def check(doc):
    assert doc["results"]["squares"] == [i * i for i in range(doc["params"]["n"])]


STUDY = Study(name="toy", notebook="99_toy", title="Toy: squares", params=ToyParams, compute=compute,
              produces=("table9_toy",), check=check)
'''


@pytest.fixture
def toy(tmp_path):
    """A toy study module, its notebook and a smoke preset entry, beside copies of the real ones."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "toy.py").write_text(textwrap.dedent(TOY_MODULE))
    notebooks = tmp_path / "notebooks"
    shutil.copytree(paths.notebooks_dir(), notebooks)
    (notebooks / "presets" / "smoke" / "99_toy.yaml").write_text("preset: smoke\nn: 2\n")
    env = {**os.environ, "PAPERLIB_STUDY_PATH": str(mods), "PAPERLIB_NOTEBOOKS": str(notebooks),
           "PAPERLIB_BUILD": str(tmp_path / "build"), "TQDM_DISABLE": "1"}
    # the notebook: imports, the parameters cell written from the definition, validate, run, table
    code = subprocess.run(
        [sys.executable, "-c", "from paperlib.config import parameters_source; from paperlib.studies import toy; "
                               "print(parameters_source(toy.ToyParams))"],
        env=env, capture_output=True, text=True, check=True).stdout.strip()
    nb = new_notebook(cells=[
        new_markdown_cell("# 99 · Toy"),
        new_code_cell("from paperlib.results import save_table\nfrom paperlib.studies import configure, run, toy as study"),
        new_code_cell(code, metadata={"tags": ["parameters"]}),
        new_code_cell("cfg = configure(study, globals())"),
        new_code_cell("doc = run(study, cfg)"),
        new_code_cell('save_table(study.table(doc), "table9_toy", cfg.figure_dir)'),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebooks / "99_toy.ipynb")
    return env, tmp_path


def _paperlib(env, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "paperlib.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_a_new_study_appears_in_list_reproduce_and_the_smoke_tests(toy, real_data):
    env, tmp = toy
    listed = _paperlib(env, "list")
    assert listed.returncode == 0, listed.stderr
    assert "99_toy" in listed.stdout and "Toy: squares" in listed.stdout and "table9_toy" in listed.stdout
    assert "{'n': 2}" in listed.stdout  # its smoke preset

    # reproduce runs every registered notebook, the toy one included, with its preset
    out = tmp / "out"
    rep = _paperlib(env, "reproduce", "--preset", "smoke", "--output-dir", str(out))
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "99_toy" in rep.stdout and "01_datasets" in rep.stdout and "02_quality" in rep.stdout
    doc = json.loads((out / "results" / "toy.smoke.json").read_text())
    assert doc["results"]["squares"] == [0, 1] and doc["params"]["n"] == 2
    assert (out / "table9_toy.md").exists()

    # the smoke tests parametrize over the registry: the toy study is collected and passes
    test = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_notebooks.py"),
         "-k", "smoke_run and 99_toy", "-rA"],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert test.returncode == 0, test.stdout[-3000:]
    assert "PASSED" in test.stdout and "test_smoke_run[99_toy]" in test.stdout


def test_parameters_cell_of_the_toy_study_is_papermill_readable(toy):
    import papermill as pm

    env, tmp = toy
    declared = pm.inspect_notebook(str(tmp / "notebooks" / "99_toy.ipynb"))
    assert declared["n"]["default"] == "5" and declared["n"]["help"] == "how many squares"
    assert declared["n"]["inferred_type_name"] == "int"
    assert set(declared) == {"preset", "recompute", "output_dir", "n"}
