"""The package layout rules that keep dependencies one way (harness -> backbones)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_IMPORT_BACKBONES = """
import sys
import backbones, backbones.base, backbones.adm, backbones.adm_unet, backbones.randomconv, backbones.download
import backbones.sd, backbones.sd_prompt, backbones.dino, backbones.vit, backbones.weights, backbones.status
leaked = sorted(name for name in sys.modules if name == "harness" or name.startswith("harness."))
print(",".join(leaked))
"""


def test_backbones_do_not_import_harness() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_BACKBONES], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "", f"backbones imported harness modules: {done.stdout.strip()}"
