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

# -- DINO (issue "Self-supervised ViT backbones"): DINO's own label propagation --------------------------
# facebookresearch/dino eval_video_segmentation.py: temperature 0.1 (:129), n_last_frames 7 (:260),
# size_mask_neighborhood 12 (:261), topk 5 (:263); cosine affinities (:125-126). Frames 480p, short side
# 480 (:197-214). The paper's numbers were obtained with torch 1.7.1 (dino README, DAVIS section).
_DINO_LABEL_PROPAGATION: dict[str, Any] = {
    "method.name": "labelprop",
    "method.similarity": "cosine",
    "method.temperature": 0.1,
    "method.topk": 5,
    "method.radius": 12,
    "method.n_last_frames": 7,
    "input.short_side": 480,
}
_DINO_SOURCE = "Caron et al. 2021, DINO (ICCV), DAVIS-2017 video object segmentation table (arXiv:2104.14294)"
PUBLISHED["dino-vitb8"] = PublishedSystem(
    name="dino-vitb8",
    description="DINO ViT-B/8 last-block patch features with DINO's label propagation",
    jf=71.4,
    source=_DINO_SOURCE,
    weights=("dino-vitb8",),
    overrides={"backbone.name": "dino-vitb8", **_DINO_LABEL_PROPAGATION},
)
PUBLISHED["dino-vits8"] = PublishedSystem(
    name="dino-vits8",
    description="DINO ViT-S/8 last-block patch features with DINO's label propagation",
    jf=69.9,
    source=_DINO_SOURCE,
    weights=("dino-vits8",),
    overrides={"backbone.name": "dino-vits8", **_DINO_LABEL_PROPAGATION},
)


def published_system(name: str) -> PublishedSystem | None:
    return PUBLISHED.get(name)
