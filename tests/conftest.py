"""Shared fixtures. Tests never touch the network and write only to temporary folders."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# training checkpoints of the tests never mix with a user's (they default to the cache folder); each
# test also gets a folder of its own (see _own_checkpoints): this one serves module-scoped fixtures
os.environ["PAPERLIB_CHECKPOINTS"] = tempfile.mkdtemp(prefix="paperlib-test-checkpoints-")


@pytest.fixture(autouse=True)
def _own_checkpoints(tmp_path, monkeypatch):
    """Each test trains into its own checkpoint folder, so no test reuses a model that another one
    trained (runs are reused by key, and two tests can share settings)."""
    monkeypatch.setenv("PAPERLIB_CHECKPOINTS", str(tmp_path / "checkpoints"))


def shared_data_dir() -> Path | None:
    """``$PAPERLIB_DATA`` if set, else ``../shared/data`` beside the repository, else None."""
    env = os.environ.get("PAPERLIB_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The folder of real datasets; tests needing it are skipped where it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("real datasets not found: set PAPERLIB_DATA (CI uses ../shared/data)")
    os.environ["PAPERLIB_DATA"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def python3_kernel_is_this_interpreter():
    """PITFALLS #5: the ``python3`` kernelspec that papermill/nbval use must run this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    exe = spec.argv[0]
    # jupyter_client replaces a bare "python"/"python3"/"python3.X" with sys.executable at launch
    bare = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    if exe not in bare and Path(exe).resolve() != Path(sys.executable).resolve():
        pytest.exit(f"the python3 kernel runs {exe}, not {sys.executable}: run `make setup` "
                    "(it registers the project's kernel)", returncode=3)
