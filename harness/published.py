"""Published DAVIS-2017 val results of the systems the harness reproduces, in one table.

Each row names the released code its settings come from. ``overrides`` are dotted run-config keys
(``backbone.timestep``, ``method.topk``, ...) that turn the defaults into exactly that system's setting;
the numbers are J&F on the 0-100 scale, as the papers print them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PublishedSystem:
    #: the name used by `harness reproduce` and shown on leaderboards
    name: str
    description: str
    #: J&F-Mean on DAVIS-2017 val, 0-100
    jf: float
    #: paper / table the number comes from
    source: str
    #: registered backbone names whose weights the system needs
    weights: tuple[str, ...]
    #: dotted run-config overrides that give the released setting
    overrides: dict[str, Any] = field(default_factory=dict)


#: filled in by the fidelity work (issue "Fidelity to the published configurations")
PUBLISHED: dict[str, PublishedSystem] = {}


def published_system(name: str) -> PublishedSystem | None:
    return PUBLISHED.get(name)
