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
    #: J&F-Mean on DAVIS-2017 val, 0-100; None where the released tables print no number for this setting
    jf: float | None
    #: paper / table the number comes from
    source: str
    #: registered backbone names whose weights the system needs
    weights: tuple[str, ...]
    #: dotted run-config overrides that give the released setting
    overrides: dict[str, Any] = field(default_factory=dict)


PUBLISHED: dict[str, PublishedSystem] = {}

# -- the paper's released settings (github thanosDelatolas/diff-zvos) and DIFT's (github Tsingularity/dift).
# Every value with its source line: harness/reproduce.py RELEASED. The numbers are the DAVIS-17 val column of
# the state-of-the-art table in diff-zvos README.md ("DIFT-SD 70.0", "DIFT-ADM 75.7", "ADM + MAGFilter
# 76.8"). That table has no row for SD 2.1 without prompt learning, hence no number for paper-sd21.
_RELEASED_PROPAGATION = {
    "method.temperature": 0.2,
    "method.topk": 15,
    "method.radius": 15,
    "method.n_last_frames": 28,
    "method.similarity": "cosine",
}
_DAVIS_480 = {"dataset.split": "val", "dataset.resolution": "480p", "input.short_side": 480}
PUBLISHED.update(
    {
        "paper-adm": PublishedSystem(
            name="paper-adm",
            description=(
                "the paper's ADM setting as released (t 30, layer 6, 8 draws). The published 76.8 is the "
                "README's 'ADM + MAGFilter' row, a filter the released code does not contain"
            ),
            jf=76.8,
            source="diff-zvos README.md, state-of-the-art table, 'ADM + MAGFilter', DAVIS-17 val",
            weights=("adm",),
            overrides={
                "backbone.name": "adm",
                "backbone.timestep": 30,
                "backbone.layer": 6,
                "backbone.ensemble_size": 8,
            }
            | _RELEASED_PROPAGATION
            | _DAVIS_480,
        ),
        "paper-sd21": PublishedSystem(
            name="paper-sd21",
            description="the paper's SD 2.1 setting as released (t 100, layer 9, 8 draws, empty prompt)",
            jf=None,
            source="diff-zvos docs/EVALUATION.md:29 and src/config/eval.yaml (no published number)",
            weights=("sd2.1",),
            overrides={
                "backbone.name": "sd2.1",
                "backbone.timestep": 100,
                "backbone.layer": 9,
                "backbone.ensemble_size": 8,
            }
            | _RELEASED_PROPAGATION
            | _DAVIS_480,
        ),
        "dift-adm": PublishedSystem(
            name="dift-adm",
            description="DIFT with ADM (t 51, output block 7, 4 draws, temperature 0.1, top-k 10)",
            jf=75.7,
            source="diff-zvos README.md, state-of-the-art table, 'DIFT-ADM', DAVIS-17 val",
            weights=("adm",),
            overrides={
                "backbone.name": "adm",
                "backbone.timestep": 51,
                "backbone.layer": 7,
                "backbone.ensemble_size": 4,
            }
            | _RELEASED_PROPAGATION
            | {"method.temperature": 0.1, "method.topk": 10, "method.memory_caps": "shooting=10"}
            | _DAVIS_480,
        ),
        "dift-sd21": PublishedSystem(
            name="dift-sd21",
            description="DIFT with SD 2.1 (t 51, up block 2 output, 8 draws, temperature 0.2, top-k 15)",
            jf=70.0,
            source="diff-zvos README.md, state-of-the-art table, 'DIFT-SD', DAVIS-17 val",
            weights=("sd2.1",),
            overrides={
                "backbone.name": "sd2.1",
                "backbone.timestep": 51,
                "backbone.layer": "up_ft2",
                "backbone.ensemble_size": 8,
            }
            | _RELEASED_PROPAGATION
            | {"method.memory_caps": "shooting=10"}
            | _DAVIS_480,
        ),
    }
)

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
