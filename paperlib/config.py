"""Presets and notebook parameters.

Each notebook's ``parameters`` cell holds typed literals only (PITFALLS #3–4). Parameters left as
``None`` take the value of the chosen preset (``notebooks/presets/<preset>.yaml``, one section per
notebook), and then the dataclass default. The next cell turns them into a typed config with
:func:`resolve`, which fails loudly on unknown names and wrong types. The CLI, the tests and the
notebooks all read the same preset files through this module.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from paperlib import paths

PRESETS: tuple[str, ...] = ("smoke", "quick", "paper")
COMMITTED_PRESET = "quick"  # the preset whose results the committed notebooks and figures show


class ConfigError(ValueError):
    """A bad preset or parameter: the message names it and the valid choices."""


@dataclass
class NotebookParams:
    """Parameters every notebook has.

    Attributes:
        preset: ``smoke`` (seconds, CI), ``quick`` (a laptop CPU), ``paper`` (the paper's settings).
        recompute: True runs the study and writes the results JSON; False renders from it.
        output_dir: where figures, tables and ``results/`` go; empty means ``figures/``.
    """

    preset: str = "quick"
    recompute: bool = False
    output_dir: str = ""

    @property
    def figure_dir(self) -> str:
        """Where figures and tables go: ``output_dir`` if set; else ``figures/`` for the committed
        preset and ``figures/<preset>/`` for the others, so a smoke or paper run never overwrites
        the committed figures (results JSON files carry the preset in their name either way)."""
        if self.output_dir:
            return self.output_dir
        root = paths.figures_dir()
        return str(root if self.preset == COMMITTED_PRESET else root / self.preset)


P = TypeVar("P", bound=NotebookParams)


def preset_path(preset: str) -> Path:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    path = paths.presets_dir() / f"{preset}.yaml"
    if not path.exists():
        raise ConfigError(f"preset file {path} is missing")
    return path


def load_preset(preset: str, notebook: str | None = None) -> dict[str, Any]:
    """The whole preset (``notebook=None``) or one notebook's section of it (``{}`` if absent)."""
    with open(preset_path(preset), encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {preset!r} must be a mapping of notebook name to parameters")
    if notebook is None:
        return data
    section = data.get(notebook) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"preset {preset!r}: section {notebook!r} must be a mapping")
    return dict(section)


def _type_ok(value: Any, annotation: Any) -> bool:
    """Is ``value`` an instance of a simple annotation (str, int, float, bool, list[...], dict, unions)?"""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        # papermill and YAML may hand an int where a float is meant; never a bool
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def resolve(cls: type[P], notebook: str, **given: Any) -> P:
    """Build the typed config of ``notebook`` from its parameters cell values.

    ``given`` holds the parameters cell's variables. ``None`` means "take the preset's value".
    Raises ConfigError for unknown names (in ``given`` or the preset) and wrongly typed values.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(given) - names
    if unknown:
        raise ConfigError(
            f"{notebook}: unknown parameter(s) {sorted(unknown)}; valid parameters: {sorted(names)}"
        )
    preset = given.get("preset") or NotebookParams.preset
    section = load_preset(preset, notebook)
    bad = set(section) - names
    if bad:
        raise ConfigError(f"preset {preset!r}, section {notebook!r}: unknown parameter(s) {sorted(bad)}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        value = given.get(f.name)
        if value is None:
            value = section.get(f.name)
        if value is None:
            continue  # dataclass default
        if not _type_ok(value, hints[f.name]):
            raise ConfigError(
                f"{notebook}: parameter {f.name!r} must be {_type_name(hints[f.name])}, "
                f"got {type(value).__name__} {value!r}"
            )
        if hints[f.name] is float and isinstance(value, int):
            value = float(value)
        values[f.name] = value
    values["preset"] = preset
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg

