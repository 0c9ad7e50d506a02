"""How the study notebooks are run.

* compute runs go through papermill: the preset's values and the overrides are injected after the
  ``parameters`` cell, the executed copy goes to ``build/notebooks/<name>.<preset>.ipynb``;
* the committed notebooks are re-rendered in place with nbclient and no injection (their
  parameters cell says ``recompute = False``), so they carry the outputs of a render-mode run and
  no papermill metadata (DESIGN §6, PITFALLS #18). Their parameters cell is written from the
  study's parameter definitions first, so it always shows what the code declares.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from paperlib import paths
from paperlib.config import COMMITTED_PRESET, EXPLICIT, PRESETS, ConfigError, merge, parameters_source
from paperlib.studies import Study, get_study, studies

KERNEL_NAME = "python3"  # PITFALLS #5: never a conda-env-… name


def declared_parameters(study: Study) -> dict[str, Any]:
    """The names and defaults of the notebook's ``parameters`` cell (papermill's own parser)."""
    import papermill as pm

    return pm.inspect_notebook(str(study.path))


@contextmanager
def _kernel_env() -> Iterator[None]:
    """Environment the kernel inherits: progress bars off (they would flood the executed notebook,
    PITFALLS #10) unless the caller set TQDM_DISABLE itself."""
    new = {"TQDM_DISABLE": os.environ.get("TQDM_DISABLE", "1")}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(
    name: str,
    preset: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    recompute: bool = True,
    output_dir: str | os.PathLike | None = None,
    executed_path: str | os.PathLike | None = None,
    progress: bool = True,
    log_output: bool = False,
) -> Path:
    """Run one notebook through papermill and return the executed copy's path.

    The parameters are validated here first (unknown names, wrong types, bad values raise
    ConfigError before anything runs), then the preset's values and ``overrides`` are injected.
    """
    import papermill as pm

    study = get_study(name)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    overrides = dict(overrides or {})
    if output_dir:
        overrides["output_dir"] = str(Path(output_dir).resolve())
    overrides["recompute"] = recompute
    cfg = merge(study.params, study.notebook, preset, overrides)  # fails loudly before running
    declared = declared_parameters(study)
    missing = set(cfg.to_dict()) - set(declared)
    if missing:
        raise ConfigError(f"{study.path} does not declare {sorted(missing)}: re-render it (paperlib reproduce)")
    params = {k: v for k, v in cfg.to_dict().items()}
    params[EXPLICIT] = sorted(overrides)
    out = Path(executed_path) if executed_path else paths.build_dir() / "notebooks" / f"{study.notebook}.{preset}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    papermill_log = logging.getLogger("papermill")
    quiet = _DropMessage(f"Passed unknown parameter: {EXPLICIT}")  # not a declared parameter, by design
    papermill_log.addFilter(quiet)
    try:
        with _kernel_env():
            pm.execute_notebook(
                str(study.path), str(out), parameters=params, kernel_name=KERNEL_NAME,
                cwd=str(paths.notebooks_dir()), progress_bar=progress, log_output=log_output,
            )
    finally:
        papermill_log.removeFilter(quiet)
    return out


class _DropMessage(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


def render_committed(name: str, timeout: int = 600) -> Path:
    """Re-execute a committed notebook in place in render mode (no parameter injection), after
    writing its parameters cell from the study's parameter definitions."""
    import nbformat
    from nbclient import NotebookClient

    study = get_study(name)
    nb = nbformat.read(study.path, as_version=4)
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3 (ipykernel)", "language": "python"}
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source = parameters_source(study.params)
    with _kernel_env():
        client = NotebookClient(
            nb, timeout=timeout, kernel_name=KERNEL_NAME, record_timing=False,
            resources={"metadata": {"path": str(paths.notebooks_dir())}},
        )
        client.execute()
    # keep the committed file free of run-specific metadata (PITFALLS #18)
    nb.metadata.pop("papermill", None)
    for c in nb.cells:
        c.metadata.pop("papermill", None)
        c.metadata.pop("execution", None)
    nbformat.write(nb, study.path)
    return study.path


__all__ = ["COMMITTED_PRESET", "KERNEL_NAME", "declared_parameters", "execute", "render_committed", "studies"]
