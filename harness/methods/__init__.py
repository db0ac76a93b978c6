"""Segmentation methods, looked up by name (like :mod:`backbones`).

A method is one module that decorates a class with :func:`register_method`; the class has ``name``,
``settings_class`` (a frozen dataclass with defaults, the run config's ``method:`` section without
``name``) and ``segment_sequence(ctx, settings)``. Modules are imported on first use through
:data:`_MODULES`, so adding a method is one new file plus one line there.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from harness.errors import ConfigError
from harness.methods.base import Method, SequenceContext

__all__ = [
    "Method",
    "SequenceContext",
    "available_methods",
    "get_method",
    "register_method",
]

DEFAULT_METHOD = "labelprop"

_METHODS: dict[str, Method] = {}

# name -> module that registers it; imported on first use
_MODULES: dict[str, str] = {
    "labelprop": "harness.methods.labelprop.method",
}

T = TypeVar("T")


def register_method(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make ``name`` available to :func:`get_method` (the class is instantiated once)."""

    def decorate(cls: type[T]) -> type[T]:
        settings_class = getattr(cls, "settings_class", None)
        if not (isinstance(settings_class, type) and dataclasses.is_dataclass(settings_class)):
            raise TypeError(f"method {name!r}: settings_class must be a dataclass")
        if not settings_class.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"method {name!r}: settings_class must be a frozen dataclass")
        instance: Any = cls()
        instance.name = name
        _METHODS[name] = instance
        return cls

    return decorate


def available_methods() -> list[str]:
    return sorted(set(_MODULES) | set(_METHODS))


def get_method(name: str) -> Method:
    """The registered method ``name``; ConfigError listing the known ones otherwise."""
    if not isinstance(name, str):
        raise ConfigError(f"method.name must be a string, got {name!r}")
    if name not in _METHODS and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _METHODS[name]
