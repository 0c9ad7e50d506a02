"""Study parameters and presets.

Each study defines its parameters once, as a dataclass of :func:`paperlib.fields.param` fields:
name, type, default and one line of help. From that one definition come

* the notebook's ``parameters`` cell (:func:`parameters_source`), typed and commented in
  papermill's style (``epochs: int = 20  # maximum epochs``), so ``papermill --help-notebook``
  and a reader in JupyterLab both see type, default and meaning;
* the validation of what the cell holds after papermill's injection (:func:`configure`).

The defaults are the values of the committed preset (``quick``). Every other preset is a papermill
parameter file per notebook, ``notebooks/presets/<preset>/<notebook>.yaml``, holding only what
differs (and ``preset: <name>``), so ``papermill -f`` reads it as it is; the CLI, the tests and
:func:`configure` read the same files.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from paperlib import paths
from paperlib.fields import Checked, ConfigError, check_bounds, coerce, param, type_name

PRESETS: tuple[str, ...] = ("smoke", "quick", "paper")
COMMITTED_PRESET = "quick"  # the preset whose results the committed notebooks and figures show
#: name of the list, injected by ``paperlib run``, of the parameters set explicitly on its
#: command line: they are kept even where they equal the default (see :func:`configure`)
EXPLICIT = "explicit_parameters"


@dataclass
class StudyParams(Checked):
    """Parameters every study notebook has."""

    preset: str = param(COMMITTED_PRESET, "smoke (seconds, CI), quick (a laptop CPU; the committed results) or "
                        "paper (the paper's settings)", choices=PRESETS)
    recompute: bool = param(False, "True runs the study and writes its results JSON; False renders the saved results")
    output_dir: str = param("", "folder for figures, tables and results/; empty: figures/ (figures/<preset>/ "
                            "for presets other than quick)")

    @property
    def figure_dir(self) -> str:
        """Where figures and tables go: ``output_dir`` if set; else ``figures/`` for the committed
        preset and ``figures/<preset>/`` for the others, so a smoke or paper run never overwrites
        the committed figures (results JSON files carry the preset in their name either way)."""
        if self.output_dir:
            return self.output_dir
        root = paths.figures_dir()
        return str(root if self.preset == COMMITTED_PRESET else root / self.preset)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


P = TypeVar("P", bound=StudyParams)


def preset_path(preset: str, notebook: str) -> Path:
    """``notebooks/presets/<preset>/<notebook>.yaml`` (it may not exist: then nothing differs)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return paths.presets_dir() / preset / f"{notebook}.yaml"


def load_preset(preset: str, notebook: str) -> dict[str, Any]:
    """The values preset ``preset`` sets for ``notebook`` (without the ``preset`` key itself)."""
    path = preset_path(preset, notebook)
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of parameter names to values")
    if data.get("preset", preset) != preset:
        raise ConfigError(f"{path} says preset {data['preset']!r}, not {preset!r}")
    data.pop("preset", None)
    return data


def _checked_value(cls: type, name: str, value: Any) -> Any:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    value = coerce(value, typing.get_type_hints(cls)[name], name)
    check_bounds(value, field.metadata, name)
    return value


def merge(cls: type[P], notebook: str, preset: str, overrides: Mapping[str, Any] | None = None) -> P:
    """Defaults < preset file < ``overrides``, validated: the parameters a run will use.

    Raises ConfigError for unknown names (in ``overrides`` or the preset file) and wrongly typed or
    out-of-range values, before anything is computed.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = dict(overrides or {})
    values = load_preset(preset, notebook)
    for where, given in ((f"preset {preset!r} ({preset_path(preset, notebook)})", values), (notebook, overrides)):
        unknown = sorted(set(given) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown parameter(s) {unknown}; valid parameters: {sorted(names)}")
    return cls(**{**values, **overrides, "preset": preset})


def configure(params_cls: type[P], notebook: str, namespace: Mapping[str, Any]) -> P:
    """The study's config from the variables of a notebook's parameters cell (``globals()``).

    A parameter still at its default takes the value the preset sets for it, so choosing
    ``preset = "smoke"`` in the cell is enough; any value changed in the cell (or injected by
    papermill) wins. Values ``paperlib run`` sets explicitly are kept even when they equal the
    default. Raises ConfigError for wrong types or values, before anything is computed.
    """
    fields = dataclasses.fields(params_cls)
    preset = namespace.get("preset", COMMITTED_PRESET)
    _checked_value(params_cls, "preset", preset)
    explicit = set(namespace.get(EXPLICIT) or [])
    from_preset = load_preset(preset, notebook)
    values: dict[str, Any] = {}
    for f in fields:
        if f.name not in namespace:
            continue
        value = _checked_value(params_cls, f.name, namespace[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in from_preset and f.name not in explicit and value == default:
            value = from_preset[f.name]
        values[f.name] = value
    return merge(params_cls, notebook, preset, values)


def literal(value: Any) -> str:
    """A Python literal for a parameter value, strings double-quoted as papermill writes them."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def parameters_source(params_cls: type[StudyParams]) -> str:
    """The source of a notebook's ``parameters`` cell: one typed, commented literal a line."""
    hints = typing.get_type_hints(params_cls)
    lines = []
    for f in dataclasses.fields(params_cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        line = f"{f.name}: {type_name(hints[f.name])} = {literal(default)}  # {f.metadata.get('help', '')}"
        if line.count("=") != 1 or literal(default).count("#"):
            # papermill's parser skips a line with a second '=' (and a '#' starts the help)
            raise ConfigError(f"{params_cls.__name__}.{f.name}: its default and help may not contain '=' or '#' "
                              f"(papermill could not read the line {line!r})")
        lines.append(line)
    return "\n".join(lines)


__all__ = ["COMMITTED_PRESET", "ConfigError", "EXPLICIT", "PRESETS", "StudyParams", "configure", "load_preset",
           "merge", "parameters_source", "preset_path"]
