"""The notebooks of the companion and how they are run.

* compute runs go through papermill: the preset and overrides are injected after the
  ``parameters`` cell, the executed copy goes to ``build/notebooks/<name>.<preset>.ipynb``;
* the committed notebooks are re-rendered in place with nbclient and no injection (their
  parameters cell says ``recompute = False``), so they carry the outputs of a render-mode run and
  no papermill metadata (DESIGN §6, PITFALLS #18).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paperlib import paths
from paperlib.config import COMMITTED_PRESET, PRESETS, ConfigError, preset_path

KERNEL_NAME = "python3"  # PITFALLS #5: never a conda-env-… name


@dataclass(frozen=True)
class NotebookInfo:
    name: str  # file stem, e.g. "01_datasets"
    study: str  # results file stem, e.g. "datasets"
    title: str
    produces: tuple[str, ...]  # figure/table stems under figures/

    @property
    def path(self) -> Path:
        return paths.notebooks_dir() / f"{self.name}.ipynb"


NOTEBOOKS: dict[str, NotebookInfo] = {
    nb.name: nb
    for nb in [
        NotebookInfo(
            "01_datasets",
            "datasets",
            "Datasets: statistics before and after the 5-core filter",
            ("table1_datasets", "fig1_history_lengths"),
        ),
        NotebookInfo(
            "02_quality",
            "quality",
            "Quality: Mamba4Rec vs SASRec, BERT4Rec, GRU4Rec (HR/NDCG/MRR@10)",
            ("table2_quality", "table2_quality_all_k", "fig2_validation_ndcg"),
        ),
    ]
}


def get_notebook(name: str) -> NotebookInfo:
    """Look a notebook up by stem (``01_datasets``), file name, or study name (``datasets``)."""
    stem = Path(name).stem
    for nb in NOTEBOOKS.values():
        if stem in (nb.name, nb.study):
            return nb
    raise ConfigError(f"unknown notebook {name!r}: choose one of {', '.join(NOTEBOOKS)}")


def declared_parameters(nb: NotebookInfo) -> dict[str, Any]:
    """The names and defaults of the notebook's ``parameters`` cell (papermill's own parser)."""
    import papermill as pm

    return pm.inspect_notebook(str(nb.path))


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

    Raises ConfigError for an unknown notebook, preset or parameter name before anything runs.
    """
    import papermill as pm

    nb = get_notebook(name)
    preset_path(preset)  # validates the preset name
    overrides = dict(overrides or {})
    declared = declared_parameters(nb)
    unknown = set(overrides) - set(declared)
    if unknown:  # papermill only warns (PITFALLS #2)
        raise ConfigError(f"{nb.name}: unknown parameter(s) {sorted(unknown)}; declared: {sorted(declared)}")
    params = {"preset": preset, "recompute": recompute, **overrides}
    if output_dir:
        params["output_dir"] = str(Path(output_dir).resolve())
    out = Path(executed_path) if executed_path else paths.build_dir() / "notebooks" / f"{nb.name}.{preset}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    with _kernel_env():
        pm.execute_notebook(
            str(nb.path), str(out), parameters=params, kernel_name=KERNEL_NAME,
            cwd=str(paths.notebooks_dir()), progress_bar=progress, log_output=log_output,
        )
    return out


def render_committed(name: str, timeout: int = 600) -> Path:
    """Re-execute a committed notebook in place in render mode (no parameter injection)."""
    import nbformat
    from nbclient import NotebookClient

    nb_info = get_notebook(name)
    nb = nbformat.read(nb_info.path, as_version=4)
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3 (ipykernel)", "language": "python"}
    with _kernel_env():
        client = NotebookClient(
            nb, timeout=timeout, kernel_name=KERNEL_NAME, record_timing=False,
            resources={"metadata": {"path": str(paths.notebooks_dir())}},
        )
        client.execute()
    # keep the committed file free of run-specific metadata (PITFALLS #18)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, nb_info.path)
    return nb_info.path


__all__ = ["NOTEBOOKS", "PRESETS", "NotebookInfo", "execute", "render_committed", "get_notebook", "declared_parameters"]
