"""The ``paperlib`` command."""

import json
import subprocess
import sys

import pytest

from paperlib.cli import _parse_value, main


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "01_datasets" in out and "table1_datasets" in out and "smoke" in out


def test_parse_value_keeps_types():
    assert _parse_value("3") == 3 and _parse_value("0.5") == 0.5
    assert _parse_value("[a, b]") == ["a", "b"] and _parse_value("true") is True


def test_unknown_notebook_is_a_clear_error(capsys):
    assert main(["run", "99_nothing", "--preset", "smoke"]) == 2
    assert "unknown notebook '99_nothing'" in capsys.readouterr().err


def test_unknown_benchmark(capsys):
    assert main(["bench", "nothing"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_env_runs(real_data, capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "ml-1m" in out


@pytest.mark.slow
def test_console_script_runs_a_notebook(real_data, tmp_path):
    """As a user would: the installed ``paperlib`` script, a smoke run with an override."""
    exe = [sys.executable, "-m", "paperlib.cli"]
    env = {**__import__("os").environ, "PAPERLIB_BUILD": str(tmp_path / "b")}
    proc = subprocess.run(
        exe + ["run", "01_datasets", "--preset", "smoke", "-p", "k_core", "10", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "results" / "datasets.smoke.json").read_text())
    assert doc["params"]["k_core"] == 10 and doc["results"]["protocol"]["k_core"] == 10
    assert "table1_datasets.md" in proc.stdout
