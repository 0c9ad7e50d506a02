"""The results contract (DESIGN §6): one JSON per (study, preset) with provenance, and the figures
and tables drawn from it.

A compute run writes ``<output_dir>/results/<study>.<preset>.json`` atomically (temporary file, then
rename), so a run that fails never overwrites earlier results. Render mode reads the JSON back;
figures and tables are then drawn from the JSON alone.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from paperlib import __version__, paths
from paperlib.runtime import atomic_write

SCHEMA_VERSION = 1


class ResultsError(FileNotFoundError):
    """Results JSON missing or unreadable; the message says how to produce it."""


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def device_description() -> dict[str, Any]:
    """CPU/GPU the run used, for provenance."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance(wall_seconds: float | None = None, started: str | None = None) -> dict[str, Any]:
    """Git commit, package versions, device and timing of a run."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "paperlib": __version__,
        "python": sys.version.split()[0],
        "versions": {p: _version(p) for p in ("torch", "numpy", "pandas", "numba", "transformers", "trl", "mamba-ssm")},
        "device": device_description(),
        "started": started,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": wall_seconds,
    }


def _jsonable(obj: Any) -> Any:
    """numpy/pandas/torch scalars and arrays → plain JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch tensors
        return _jsonable(obj.tolist())
    return obj


def results_path(study: str, preset: str, output_dir: str | os.PathLike | None = None) -> Path:
    return paths.results_dir(output_dir) / f"{study}.{preset}.json"


def save_results(
    study: str,
    preset: str,
    params: Mapping[str, Any],
    results: Mapping[str, Any],
    *,
    output_dir: str | os.PathLike | None = None,
    wall_seconds: float | None = None,
    started: str | None = None,
    extra_provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write the results JSON atomically and return its path.

    Args:
        study: study name (``datasets``, ``quality``, …).
        preset: the preset the run used.
        params: the resolved notebook parameters (stored verbatim).
        results: the study's own payload (metrics per seed, trajectories, tables' raw numbers…).
        extra_provenance: added to the provenance (a merged study lists its shards there).
    """
    path = results_path(study, preset, output_dir)
    prov = {**provenance(wall_seconds, started), **_jsonable(dict(extra_provenance or {}))}
    return _write(path, _document(study, preset, params, results, prov))


def _document(study: str, preset: str, params: Mapping[str, Any], results: Mapping[str, Any],
              prov: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The results document: schema, study, preset, params, results, any ``extra`` keys, provenance."""
    return {"schema": SCHEMA_VERSION, "study": study, "preset": preset, "params": _jsonable(dict(params)),
            "results": _jsonable(dict(results)), **{k: _jsonable(v) for k, v in extra.items()},
            "provenance": dict(prov)}


def _write(path: Path, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` as indented JSON, atomically (a failed write leaves the old file)."""
    with atomic_write(path) as fh:
        json.dump(doc, fh, indent=1, sort_keys=False)
        fh.write("\n")
    return path


def load_results(study: str, preset: str, output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a results JSON; a clear error says how to compute it when it is missing."""
    path = results_path(study, preset, output_dir)
    if not path.exists():
        raise ResultsError(
            f"no results for study {study!r}, preset {preset!r} at {path}. Compute them with "
            f"`paperlib run <notebook> --preset {preset}` (or set recompute=True in the notebook)."
        )
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path} is not valid JSON ({exc}); recompute it") from exc
    if doc.get("study") != study or doc.get("preset") != preset:
        raise ResultsError(f"{path} holds study {doc.get('study')!r} preset {doc.get('preset')!r}, not {study!r}/{preset!r}")
    return doc


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- figures and tables


def set_style() -> None:
    """The shared plot style: seaborn whitegrid, colour-blind palette, fixed size and DPI."""
    import matplotlib
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)
    matplotlib.rcParams.update(
        {"figure.figsize": (7.0, 4.0), "figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight",
         "pdf.fonttype": 42, "svg.hashsalt": "paperlib"}
    )


def save_figure(fig, name: str, output_dir: str | os.PathLike | None = None) -> list[Path]:
    """Save ``fig`` as ``<figures>/<name>.png`` and ``.pdf`` (reproducible: no creation date)."""
    out = paths.figures_dir(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, pdf = out / f"{name}.png", out / f"{name}.pdf"
    fig.savefig(png, metadata={"Software": None})
    fig.savefig(pdf, metadata={"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None})
    return [png, pdf]


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of ``df`` (index included when named)."""
    frame = df.reset_index() if df.index.name or isinstance(df.index, pd.MultiIndex) else df
    cols = [str(c) for c in frame.columns]
    rows = [[str(v) for v in row] for row in frame.itertuples(index=False)]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep, *(line(r) for r in rows)]) + "\n"


def save_table(df: pd.DataFrame, name: str, output_dir: str | os.PathLike | None = None, caption: str = "") -> list[Path]:
    """Save ``df`` as ``<figures>/<name>.md``, ``.tex`` and ``.csv``."""
    out = paths.figures_dir(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, tex, csv = out / f"{name}.md", out / f"{name}.tex", out / f"{name}.csv"
    md.write_text((f"{caption}\n\n" if caption else "") + markdown_table(df), encoding="utf-8")
    tex.write_text(df.to_latex(caption=caption or None, label=f"tab:{name}"), encoding="utf-8")
    df.to_csv(csv)
    return [md, tex, csv]


# ----------------------------------------------------------------------------- partial results (shards)
#
# A study split with ``paperlib run … --shard i/n`` writes one partial results file per shard,
# ``<results>/shards/<study>.<preset>.<i>-of-<n>.json``: the same document as a results JSON plus
# ``shard`` (its index, the shard count, the indices of its runs in the study's order and the
# study's number of runs) and ``code`` (the fingerprint of the code that shapes a run).
# ``paperlib merge`` combines them (:func:`paperlib.distributed.merge_partials`) into the one
# results JSON the notebook renders.


def partials_dir(output_dir: str | os.PathLike | None = None) -> Path:
    return paths.results_dir(output_dir) / "shards"


def partial_results_path(study: str, preset: str, label: str, output_dir: str | os.PathLike | None = None) -> Path:
    """The partial results file of shard ``label`` (``2-of-8``)."""
    return partials_dir(output_dir) / f"{study}.{preset}.{label}.json"


def save_partial_results(
    study: str,
    preset: str,
    params: Mapping[str, Any],
    results: Mapping[str, Any],
    *,
    shard: Mapping[str, Any],
    code: str,
    output_dir: str | os.PathLike | None = None,
    wall_seconds: float | None = None,
    started: str | None = None,
) -> Path:
    """Write one shard's partial results atomically and return the path.

    Args:
        shard: ``index``, ``count`` (1-based ``i`` of ``n``), ``runs`` (indices of the payload's
            runs in the study's order) and ``total`` (the study's number of runs).
        code: fingerprint of the code that shapes a run; partials of other code are not merged.
    """
    label = f"{shard['index']}-of-{shard['count']}"
    path = partial_results_path(study, preset, label, output_dir)
    doc = _document(study, preset, params, results, provenance(wall_seconds, started), shard=dict(shard), code=code)
    return _write(path, doc)


def load_partial_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a partial results file; a clear error for a missing, unreadable or wrong one."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"no partial results at {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path} is not valid JSON ({exc}); compute that shard again") from exc
    needed = {"study", "preset", "params", "results", "shard", "code"}
    if not isinstance(doc, dict) or not needed <= set(doc):
        raise ResultsError(f"{path} is not a partial results file (it lacks "
                           f"{sorted(needed - set(doc)) if isinstance(doc, dict) else sorted(needed)})")
    return doc


def find_partial_results(study: str, preset: str, output_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every partial results file of (study, preset) in the results folder, by name."""
    return sorted(partials_dir(output_dir).glob(f"{study}.{preset}.*-of-*.json"))
