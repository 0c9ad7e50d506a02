"""Typed, documented configuration fields and the one checker every config uses.

A config is a dataclass whose fields carry their help text (and bounds) as metadata::

    @dataclass
    class TrainConfig(Checked):
        epochs: int = param(300, "maximum epochs", min=1)

``Checked.__post_init__`` coerces each value to its annotation (an int is accepted for a float,
never a bool for a number) and checks the bounds, so a config cannot exist with a wrongly typed or
out-of-range value. Study parameters, the training loop and the model configs all go through
:func:`coerce`; their errors are :class:`ConfigError` (a ``ValueError``) naming the field, the
expected type and the value given.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad parameter or option: the message names it, what was expected and what was given."""


def param(default: Any, help: str, *, min: float | None = None, max: float | None = None,
          below: float | None = None, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with one line of ``help`` and optional bounds (``min``/``max``
    inclusive, ``below`` exclusive) or ``choices``. Mutable defaults (lists, dicts) are copied
    for each instance."""
    meta = {"help": help, "min": min, "max": max, "below": below, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def type_name(hint: Any) -> str:
    """``int``, ``list[str]``, ``float | None``: how an annotation reads in messages and cells."""
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` checked against annotation ``hint`` and converted where that loses nothing (an
    int for a float; a list for a tuple). Raises ConfigError naming ``name`` otherwise."""
    origin = typing.get_origin(hint)
    bad = ConfigError(f"{name!r} must be {type_name(hint)}, got {type(value).__name__} {value!r}")
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except ConfigError:
                continue
        raise bad
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{name!r} must be one of {typing.get_args(hint)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = [a for a in typing.get_args(hint) if a is not Ellipsis] or [Any]
        items = [coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise bad
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise bad
    return value


def check_bounds(value: Any, meta: typing.Mapping[str, Any], name: str) -> None:
    """The ``min``/``max``/``choices`` of a field's metadata (each element of a list)."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v is None or isinstance(v, bool):
            continue
        if meta.get("choices") is not None and v not in meta["choices"]:
            raise ConfigError(f"{name!r} must be one of {list(meta['choices'])}, got {v!r}")
        if meta.get("min") is not None and v < meta["min"]:
            raise ConfigError(f"{name!r} must be >= {meta['min']}, got {v!r}")
        if meta.get("max") is not None and v > meta["max"]:
            raise ConfigError(f"{name!r} must be <= {meta['max']}, got {v!r}")
        if meta.get("below") is not None and v >= meta["below"]:
            raise ConfigError(f"{name!r} must be < {meta['below']}, got {v!r}")


def check_fields(obj: Any, prefix: str = "") -> None:
    """Coerce and bound-check every field of dataclass ``obj`` in place."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        name = f"{prefix}{f.name}"
        value = coerce(getattr(obj, f.name), hints[f.name], name)
        check_bounds(value, f.metadata, name)
        object.__setattr__(obj, f.name, value)


def build(cls: type, values: typing.Mapping[str, Any], what: str) -> Any:
    """``cls(**values)`` with a clear error for unknown names (listing the valid ones)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{what}: unknown parameter(s) {unknown}; valid: {sorted(names)}")
    return cls(**values)


class Checked:
    """Mixin for config dataclasses: fields are coerced and bound-checked on construction, then
    ``validate()`` (a subclass hook for checks across fields) runs. Errors name the class."""

    def __post_init__(self) -> None:
        try:
            check_fields(self)
            self.validate()
        except ConfigError as err:
            raise ConfigError(f"{type(self).__name__}: {err}") from None

    def validate(self) -> None:
        """Checks that involve several fields; raise ConfigError."""


def help_of(cls: type) -> dict[str, str]:
    """``{field name: help}`` of a config dataclass."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


__all__ = ["Checked", "ConfigError", "build", "check_bounds", "check_fields", "coerce", "help_of", "param", "type_name"]
