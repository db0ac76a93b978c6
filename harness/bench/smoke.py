"""Smoke models at the default resolution: seconds per frame of each tiny backbone on one 480p frame.

The tiny models exist so people can try the real code paths on a CPU; this measures that they stay quick
at the resolution runs use (one 854x480 DAVIS frame -> a 480x832 network input). Best of a few calls of
``Backbone.extract`` at each backbone's default time step and layer, after one warm-up call.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from backbones import load_backbone
from harness.bench.common import BenchOptions

TINY_BACKBONES = (
    "adm-tiny",
    "sd-tiny",
    "dino-vits8-tiny",
    "dino-vitb8-tiny",
    "dino-xcits8-tiny",
    "random-conv",
)
FULL_INPUT = (480, 832)
QUICK_INPUT = (64, 96)


def time_backbone(name: str, input_size: tuple[int, int], device: str, repeats: int) -> dict[str, Any]:
    backbone = load_backbone(name, device=device)
    frame = torch.rand((1, 3, *input_size), generator=torch.Generator().manual_seed(0)) * 2 - 1
    settings = {
        "timestep": backbone.default_timestep,
        "layers": [backbone.default_layer],
        "ensemble_size": 1,
        "seed": 0,
        "sequence": "smoke",
    }
    seconds = []
    for index in range(repeats + 1):  # the first call warms up and is not counted
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        backbone.extract(frame.to(device), frame_indices=[index], **settings)
        if device == "cuda":
            torch.cuda.synchronize()
        if index > 0:
            seconds.append(time.perf_counter() - started)
    return {"backbone": name, "layer": str(backbone.default_layer), "best_s": min(seconds), "calls": repeats}


def run(options: BenchOptions) -> dict[str, Any]:
    input_size = QUICK_INPUT if options.quick else FULL_INPUT
    repeats = options.repeats or (1 if options.quick else 3)
    rows = [time_backbone(name, input_size, options.device, repeats) for name in TINY_BACKBONES]
    return {
        "settings": {"scale": options.scale, "device": options.device, "repeats": repeats},
        "input_size": list(input_size),
        "device": options.device,
        "backbones": rows,
        "notes": [
            "best of the timed Backbone.extract calls on one random frame (after a warm-up call), "
            "each backbone at its default time step and layer, ensemble 1"
        ],
    }


def format_report(report: dict[str, Any]) -> str:
    height, width = report["input_size"]
    lines = [f"tiny backbones, one {width}x{height} frame on {report['device']} (best of the timed calls):"]
    for row in report["backbones"]:
        lines.append(f"  {row['backbone']:<18} layer {row['layer']:<4} {row['best_s']:.3f} s/frame")
    return "\n".join(lines)
