"""Feature extractors, looked up by name.

``load_backbone("adm")`` builds a backbone; each module registers its classes with :func:`register`.
Modules are imported lazily so that listing backbones does not import diffusers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from backbones.base import Backbone, LayerInfo, LayerKey, frame_generator
from backbones.errors import ConfigError

__all__ = [
    "Backbone",
    "LayerInfo",
    "LayerKey",
    "available_backbones",
    "describe_backbone",
    "frame_generator",
    "load_backbone",
    "register",
]

_FACTORIES: dict[str, Callable[..., Backbone]] = {}

# name -> module that registers it; imported on first use
_MODULES: dict[str, str] = {
    "random-conv": "backbones.randomconv",
    "adm": "backbones.adm",
    "adm-tiny": "backbones.adm",
    "sd2.1": "backbones.sd",
    "sd1.1": "backbones.sd",
    "sd1.2": "backbones.sd",
    "sd1.3": "backbones.sd",
    "sd1.4": "backbones.sd",
    "sd1.5": "backbones.sd",
    "sd": "backbones.sd",
    "sd-tiny": "backbones.sd",
    "dino-vits8": "backbones.dino",
    "dino-vitb8": "backbones.dino",
    "dino-xcits8": "backbones.dino",
    "dino-vits8-tiny": "backbones.dino",
    "dino-vitb8-tiny": "backbones.dino",
    "dino-xcits8-tiny": "backbones.dino",
}


def register(
    name: str, module: str | None = None
) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Class/function decorator: make ``name`` loadable with :func:`load_backbone`."""

    def decorate(factory: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _FACTORIES[name] = factory
        return factory

    return decorate


def available_backbones() -> list[str]:
    return sorted(set(_MODULES) | set(_FACTORIES))


def load_backbone(
    name: str, weights: str | None = None, device: str | torch.device | None = None, **options: object
) -> Backbone:
    """Build the backbone ``name``; ``weights`` (a checkpoint file or model folder) overrides the lookup."""
    if name not in _FACTORIES and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _FACTORIES:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _FACTORIES[name](weights=weights, device=torch.device(device), **options)


def describe_backbone(name: str) -> dict[str, object]:
    """Name, default t and layer, layer table and weights location, without loading weights.

    Backbones with large weights provide a ``describe_static()`` class method; weight-free ones are
    simply built.
    """
    if name not in _FACTORIES and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _FACTORIES:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    factory = _FACTORIES[name]
    static = getattr(factory, "describe_static", None)
    if callable(static):
        return static()
    return load_backbone(name, device="cpu").describe()
