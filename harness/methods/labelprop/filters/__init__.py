"""Correspondence filters: a named stage between the local window and the top-k of label propagation.

A filter sees, for each block of queries, the query and key positions (the block's rectangles on the
feature grid) and a per-frame :class:`FilterContext` (which frame each memory slot holds, and the ground
truth of the query frame and of every memory frame at feature resolution when the dataset has it). It
returns which (key, query) pairs to keep; the kernel drops the others before the top-k, on the float32 and
the bfloat16-screened path alike. A query none of whose window keys is kept keeps its unfiltered window
(defined here instead of dividing 0 by 0), and such queries are counted.

Adding a filter is one new module that decorates a class with :func:`register_filter`, plus one line in
:data:`_MODULES`.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

from harness.errors import ConfigError

if TYPE_CHECKING:
    from harness.methods.labelprop.affinity import QueryBlock

__all__ = [
    "CorrespondenceFilter",
    "FilterContext",
    "FilterStats",
    "available_filters",
    "get_filter",
    "register_filter",
]


@dataclass(frozen=True)
class FilterContext:
    """What a filter knows about the frame being propagated.

    ``memory_frames[n]`` is the frame index held by memory slot n (slot 0 = frame 0). ``query_truth`` (h, w)
    and ``memory_truth`` (h, w, N) are int64 ground-truth channel indices at feature resolution (nearest
    resize), or None when the split has no full ground truth.
    """

    frame: int
    memory_frames: tuple[int, ...]
    query_truth: torch.Tensor | None = None
    memory_truth: torch.Tensor | None = None


class CorrespondenceFilter(Protocol):
    """``keep(context, block)`` -> bool (key rows, key cols, N, queries of the block, row-major)."""

    name: str
    #: a filter that needs ground truth is refused (DataError) on splits without it
    needs_ground_truth: bool

    def keep(self, context: FilterContext, block: QueryBlock) -> torch.Tensor: ...


class FilterStats:
    """Queries whose window had no kept key (they kept their unfiltered window). Thread safe: the screened
    path's worker threads record into one."""

    def __init__(self) -> None:
        self.queries = 0
        self.unfiltered_queries = 0
        self._lock = threading.Lock()

    def record(self, queries: int, unfiltered: int) -> None:
        with self._lock:
            self.queries += queries
            self.unfiltered_queries += unfiltered


_FILTERS: dict[str, CorrespondenceFilter] = {}

# name -> module that registers it; imported on first use
_MODULES: dict[str, str] = {
    "first-frame": "harness.methods.labelprop.filters.first_frame",
    "oracle": "harness.methods.labelprop.filters.oracle",
}

T = TypeVar("T")


def register_filter(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make ``name`` usable as ``method.filter`` (the class is instantiated once)."""

    def decorate(cls: type[T]) -> type[T]:
        instance = cls()
        instance.name = name  # type: ignore[attr-defined]
        _FILTERS[name] = instance  # type: ignore[assignment]
        return cls

    return decorate


def available_filters() -> list[str]:
    return sorted(set(_MODULES) | set(_FILTERS))


def get_filter(name: str) -> CorrespondenceFilter:
    if not isinstance(name, str):
        raise ConfigError(f"method.filter must be a filter name or null, got {name!r}")
    if name not in _FILTERS and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _FILTERS:
        known = ", ".join(available_filters())
        raise ConfigError(f"unknown correspondence filter {name!r}; available: {known}")
    return _FILTERS[name]
