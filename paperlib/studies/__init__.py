"""The study registry: every module in this package (or in a folder named by
``$PAPERLIB_STUDY_PATH``) that defines ``STUDY = Study(...)`` is a study. The CLI (``paperlib
list``, ``run``, ``reproduce``), the smoke tests and the hygiene tests discover studies here, so
adding one is: a module, a notebook, and preset entries.

A study declares its notebook, its parameters (a :class:`paperlib.config.StudyParams` dataclass),
what it produces, and a check of its results::

    STUDY = Study(name="quality", notebook="02_quality", title="Quality: ...", params=QualityParams,
                  compute=compute, produces=("table2_quality", "fig2_validation_ndcg"),
                  check=check_results)
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paperlib import paths, results
from paperlib.config import ConfigError, StudyParams, configure as _configure

# extra folders of study modules (tests add a toy study this way; so can a user's own studies)
__path__.extend(p for p in os.environ.get("PAPERLIB_STUDY_PATH", "").split(os.pathsep) if p)  # type: ignore[name-defined]  # noqa: F821


@dataclass(frozen=True)
class Study:
    """One study: its results file stem, notebook, parameters and outputs.

    Attributes:
        name: results file stem (``figures/results/<name>.<preset>.json``).
        notebook: notebook file stem (``notebooks/<notebook>.ipynb``), ``NN_<name>``.
        title: one line for ``paperlib list``.
        params: the parameters dataclass (defaults = the committed preset's values).
        compute: ``compute(cfg, progress=True) -> results doc``: runs the study, writes the JSON.
        produces: figure and table stems written under the figure folder.
        check: ``check(doc)`` raises AssertionError where a results JSON is not what this study
            writes (used on every smoke run).
    """

    name: str
    notebook: str
    title: str
    params: type[StudyParams]
    compute: Callable[..., dict]
    produces: tuple[str, ...]
    check: Callable[[dict], None] | None = None

    @property
    def path(self) -> Path:
        return paths.notebooks_dir() / f"{self.notebook}.ipynb"

    def load(self, cfg: StudyParams) -> dict:
        """The results JSON of ``cfg.preset`` (written by ``compute``)."""
        return results.load_results(self.name, cfg.preset, cfg.output_dir)


def studies() -> dict[str, Study]:
    """Every registered study, by notebook name, in notebook order."""
    found: dict[str, Study] = {}
    for info in pkgutil.iter_modules(__path__):  # type: ignore[name-defined]  # noqa: F821
        module = importlib.import_module(f"{__name__}.{info.name}")
        study = getattr(module, "STUDY", None)
        if isinstance(study, Study):
            if study.notebook in found:
                raise ConfigError(f"two studies claim notebook {study.notebook!r}")
            found[study.notebook] = study
    return dict(sorted(found.items()))


def get_study(name: str) -> Study:
    """Look a study up by notebook stem (``02_quality``), file name, or study name (``quality``)."""
    stem = Path(name).stem
    registry = studies()
    for study in registry.values():
        if stem in (study.notebook, study.name):
            return study
    raise ConfigError(f"unknown notebook {name!r}: choose one of {', '.join(registry)}")


def configure(study_module: Any, namespace: Mapping[str, Any]) -> StudyParams:
    """The validated config of a notebook's parameters cell: ``cfg = configure(study, globals())``
    (see :func:`paperlib.config.configure`)."""
    study: Study = study_module.STUDY
    return _configure(study.params, study.notebook, namespace)


def run(study_module: Any, cfg: StudyParams) -> dict:
    """Compute (``cfg.recompute``) or load the study's results JSON."""
    study: Study = study_module.STUDY
    return study.compute(cfg) if cfg.recompute else study.load(cfg)


__all__ = ["Study", "configure", "get_study", "run", "studies"]
