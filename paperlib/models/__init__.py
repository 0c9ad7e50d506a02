"""Model registry: name → (config class, model class), and builders that validate options.

>>> model = build_model("sasrec", n_items=3416, max_len=200, hidden_dropout_prob=0.2)
>>> config_from_dict("sasrec", dataclasses.asdict(model.config)) == model.config
True

``mamba4rec`` is resolved on first use (``paperlib.models.mamba4rec``), so the other models work
even where that module cannot be imported.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from paperlib.fields import ConfigError
from paperlib.models.base import ModelConfig, SequentialRecommender
from paperlib.models.bert4rec import BERT4Rec, BERT4RecConfig
from paperlib.models.gru4rec import GRU4Rec, GRU4RecConfig
from paperlib.models.sasrec import SASRec, SASRecConfig

Entry = tuple[type[ModelConfig], type[SequentialRecommender]]


class ModelRegistry(Mapping[str, Entry]):
    """Read-only mapping ``name → (config class, model class)`` with lazily imported entries."""

    def __init__(self, eager: dict[str, Entry], lazy: dict[str, tuple[str, str, str]]) -> None:
        self._entries: dict[str, Entry] = dict(eager)
        self._lazy = dict(lazy)  # name → (module, config class name, model class name)
        self._names = list(eager) + [n for n in lazy if n not in eager]

    def __getitem__(self, name: str) -> Entry:
        if name in self._entries:
            return self._entries[name]
        if name not in self._lazy:
            raise KeyError(name)
        module_name, config_name, model_name = self._lazy[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ImportError(f"model {name!r} is registered but {module_name} cannot be imported: {err}") from err
        entry = (getattr(module, config_name), getattr(module, model_name))
        self._entries[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:  # without importing lazy entries
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


MODELS: ModelRegistry = ModelRegistry(
    eager={
        "gru4rec": (GRU4RecConfig, GRU4Rec),
        "sasrec": (SASRecConfig, SASRec),
        "bert4rec": (BERT4RecConfig, BERT4Rec),
    },
    lazy={"mamba4rec": ("paperlib.models.mamba4rec", "Mamba4RecConfig", "Mamba4Rec")},
)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def config_from_dict(name: str, values: Mapping[str, Any]) -> ModelConfig:
    """Build model ``name``'s config from a dict (e.g. ``asdict(config)`` read from a checkpoint).

    Missing fields take their defaults. Raises ValueError (ConfigError) for an unknown model, an
    unknown option (naming the valid ones), or a value of the wrong type or out of range.
    """
    _check_name(name)
    config_cls, _ = MODELS[name]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {unknown}; valid options are {sorted(fields)}")
    return config_cls(**values)


def build_model(name: str, n_items: int, max_len: int, seed: int | None = None,
                **overrides: Any) -> SequentialRecommender:
    """A freshly initialised model ``name`` for a catalogue of ``n_items`` items (ids 1..n_items)
    and histories of up to ``max_len`` items; ``overrides`` set config fields by name.

    The initialisation draws from torch's global RNG. Give ``seed`` for a reproducible model: torch
    seeds its RNG differently in every process, so an unseeded build differs from run to run.
    """
    config = config_from_dict(name, {"n_items": n_items, "max_len": max_len, **overrides})
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name][1](config)


def model_name(model: SequentialRecommender) -> str:
    """The registry name of ``model`` (its class's ``name`` attribute, else a registry lookup)."""
    name = getattr(type(model), "name", None)
    if isinstance(name, str) and name in MODELS:
        return name
    for key in MODELS:
        try:
            if isinstance(model, MODELS[key][1]):
                return key
        except ImportError:
            continue
    raise ValueError(f"{type(model).__name__} is not a registered model; registered: {', '.join(MODELS)}")


__all__ = [
    "MODELS",
    "ModelConfig",
    "SequentialRecommender",
    "ModelRegistry",
    "build_model",
    "config_from_dict",
    "model_name",
    "BERT4Rec",
    "BERT4RecConfig",
    "GRU4Rec",
    "GRU4RecConfig",
    "SASRec",
    "SASRecConfig",
]
