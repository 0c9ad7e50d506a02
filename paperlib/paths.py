"""Every path the project uses, absolute and anchored at the repository root.

Papermill runs a notebook in the caller's working directory and nbval in the notebook's folder
(PITFALLS #6), so nothing in the project uses a relative path: it asks this module. Each root can
be overridden by an environment variable, which is how tests write to a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root: the folder above the ``paperlib`` package (editable install).
REPO_ROOT = Path(os.environ.get("PAPERLIB_ROOT", Path(__file__).resolve().parent.parent))


def _env_path(var: str, default: Path) -> Path:
    value = os.environ.get(var, "")
    return Path(value).expanduser().resolve() if value else default


def notebooks_dir() -> Path:
    """Committed notebooks (``notebooks/NN_<study>.ipynb``): ``$PAPERLIB_NOTEBOOKS`` or ``notebooks/``."""
    return _env_path("PAPERLIB_NOTEBOOKS", REPO_ROOT / "notebooks")


def presets_dir() -> Path:
    """Preset files (``notebooks/presets/<preset>/<notebook>.yaml``), read by CLI, tests and notebooks."""
    return notebooks_dir() / "presets"


def figures_dir(output_dir: str | os.PathLike | None = None) -> Path:
    """Where figures and tables go: ``output_dir`` if given, else ``$PAPERLIB_FIGURES``, else ``figures/``."""
    if output_dir:
        return Path(output_dir).expanduser().resolve()
    return _env_path("PAPERLIB_FIGURES", REPO_ROOT / "figures")


def results_dir(output_dir: str | os.PathLike | None = None) -> Path:
    """Results JSON files: ``<figures>/results/``."""
    return figures_dir(output_dir) / "results"


def build_dir() -> Path:
    """Executed notebook copies and checkpoints: ``$PAPERLIB_BUILD`` or ``build/``."""
    return _env_path("PAPERLIB_BUILD", REPO_ROOT / "build")


def checkpoints_dir() -> Path:
    """Training checkpoints: ``$PAPERLIB_CHECKPOINTS``, else ``checkpoints/`` in the cache folder, outside
    the repository, so that a fresh checkout (or ``git clean``) never erases a long run's progress."""
    return _env_path("PAPERLIB_CHECKPOINTS", cache_dir() / "checkpoints")


def data_dir() -> Path | None:
    """``$PAPERLIB_DATA``: a folder holding ``<dataset>/`` folders of already-present files, or None."""
    value = os.environ.get("PAPERLIB_DATA", "")
    return Path(value).expanduser().resolve() if value else None


def cache_dir() -> Path:
    """Download cache: ``$PAPERLIB_CACHE`` or ``~/.cache/paperlib``."""
    return _env_path("PAPERLIB_CACHE", Path.home() / ".cache" / "paperlib")
