"""DINO self-supervised ViTs (ViT-S/8, ViT-B/8, XCiT-S12/8) as feature backbones.

Registered names:

- ``dino-vits8``, ``dino-vitb8``, ``dino-xcits8``: the official DINO checkpoints, looked up in the
  weights folder (``$DIFFVOS_WEIGHTS_DIR`` or ``~/.cache/diffvos/weights``) and downloaded there when
  missing, then loaded strictly.
- ``dino-vits8-tiny``, ``dino-vitb8-tiny``, ``dino-xcits8-tiny``: the same classes at toy sizes with
  seeded random weights, for tests and smoke runs.

Features follow DINO's ``eval_video_segmentation.py``: the patch tokens of a block (CLS dropped),
through the final norm, on the stride-8 patch grid. Layer ``i`` is block ``i``; the default is the last
block, which is exactly what ``get_intermediate_layers(n=1)`` returns there. The networks are
deterministic: there is no noise, so the only time step is 0 and the only ensemble size is 1.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from backbones import register
from backbones.base import Backbone, LayerInfo, LayerKey
from backbones.errors import ConfigError, HarnessError
from backbones.vit import (
    VIT_B8,
    VIT_B8_TINY,
    VIT_S8,
    VIT_S8_TINY,
    XCIT_S12_P8,
    XCIT_S12_P8_TINY,
    Network,
    ViTConfig,
    XCiTConfig,
    build_network,
    random_state_dict,
)
from backbones.weights import ensure_weights_file, file_sha256, read_state_dict, weights_dir, weights_location

_RELEASE = "https://dl.fbaipublicfiles.com/dino"

#: DINO's frame normalisation, eval_video_segmentation.py:244 (note std 0.228 for red, where the usual
#: ImageNet value is 0.229: reproduced as the published evaluation ran it)
DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.228, 0.224, 0.225)

#: Frames are resized so that the short side is 480 and the long side is floored to a multiple of 64
#: (eval_video_segmentation.py:197-214). The harness floors both sides to one multiple; 32 keeps a
#: 480 short side and turns DAVIS's 854x480 into DINO's 832x480 (a 104x60 grid). Any multiple of the
#: patch size (8) would run.
DINO_SIZE_MULTIPLE = 32

#: bump when a code change alters the features a given checkpoint produces (invalidates feature caches)
_IMPLEMENTATION_VERSION = 1

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DinoWeights:
    """A published checkpoint: file name in the weights folder and its URL (dino hubconf.py:37-123)."""

    filename: str
    url: str


#: architecture preset -> published DINO checkpoint
PUBLISHED_WEIGHTS: dict[str, DinoWeights] = {
    VIT_S8.preset: DinoWeights(
        "dino_deitsmall8_pretrain.pth", f"{_RELEASE}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
    ),
    VIT_B8.preset: DinoWeights(
        "dino_vitbase8_pretrain.pth", f"{_RELEASE}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
    ),
    XCIT_S12_P8.preset: DinoWeights(
        "dino_xcit_small_12_p8_pretrain.pth",
        f"{_RELEASE}/dino_xcit_small_12_p8_pretrain/dino_xcit_small_12_p8_pretrain.pth",
    ),
}


def state_dict_problems(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches, one summary line per kind (empty = fits).

    Batch norm's ``num_batches_tracked`` counter may be absent: it is not used at inference and torch
    fills it in when loading older files.
    """
    missing = [key for key in expected if key not in state and not key.endswith(".num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    return problems


class DinoBackbone(Backbone):
    """Patch-token features of a DINO ViT or XCiT block; deterministic (time step 0, ensemble 1)."""

    #: no diffusion: the only valid time step is 0
    num_train_timesteps = 1
    default_timestep = 0
    size_multiple = DINO_SIZE_MULTIPLE

    def __init__(
        self,
        config: ViTConfig | XCiTConfig,
        weights: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        *,
        name: str,
        dtype: str = "fp32",
        weights_dir: str | os.PathLike[str] | None = None,
        init_seed: int = 0,
        default_layer: int | None = None,
    ) -> None:
        if dtype not in _DTYPES:
            raise ConfigError(f"backbone {name!r}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.config = config
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.init_seed = int(init_seed)
        self.default_layer = config.depth - 1 if default_layer is None else int(default_layer)
        if not 0 <= self.default_layer < config.depth:
            raise ConfigError(f"backbone {name!r} has layers 0..{config.depth - 1}, not {self.default_layer}")
        published = PUBLISHED_WEIGHTS.get(config.preset)
        self.weights_path, self.weights_url = weights_location(
            f"backbone {name!r}",
            weights,
            weights_dir,
            None if published is None else (published.filename, published.url),
        )
        self._net: Network | None = None
        self._weights_hash: str | None = None

    # -- weights -------------------------------------------------------------------------------------

    def _ensure_weights_file(self) -> Path | None:
        """The checkpoint path, downloading the published file if it is not there yet."""
        if self.weights_path is None:
            return None
        return ensure_weights_file(self.name, self.weights_path, self.weights_url)

    def _read_state_dict(self) -> dict[str, torch.Tensor]:
        path = self._ensure_weights_file()
        if path is None:
            return random_state_dict(self.config, self.init_seed)
        return read_state_dict(self.name, path)

    def load(self) -> DinoBackbone:
        """Build the network and read its weights now (otherwise this happens on first use)."""
        if self._net is not None:
            return self
        if self.device.type == "meta":
            raise ConfigError(f"backbone {self.name!r} cannot run on the meta device")
        with torch.device("meta"):
            net = build_network(self.config)
        state = self._read_state_dict()
        problems = state_dict_problems(state, net.state_dict())
        if problems:
            source = self.weights_path or "random init"
            raise HarnessError(
                f"{source} does not fit backbone {self.name!r} ({self.config.preset}): " + "; ".join(problems)
            )
        state = {
            key: value if key.endswith("num_batches_tracked") else value.float()
            for key, value in state.items()
        }
        for key, value in net.state_dict().items():
            if key not in state:  # only num_batches_tracked can be absent (see state_dict_problems)
                state[key] = torch.zeros(value.shape, dtype=value.dtype)
        net.load_state_dict(state, strict=True, assign=True)
        self._net = net.eval().requires_grad_(False).to(self.device)
        return self

    @property
    def net(self) -> Network:
        self.load()
        assert self._net is not None
        return self._net

    # -- Backbone interface -------------------------------------------------------------------------

    def layers(self) -> dict[LayerKey, LayerInfo]:
        return _layer_table(self.config)

    def identity(self) -> str:
        config_digest = hashlib.sha256(repr(self.config).encode()).hexdigest()[:12]
        parts = [f"dino/{self.config.preset}", f"config={config_digest}", f"impl={_IMPLEMENTATION_VERSION}"]
        path = self._ensure_weights_file()
        if path is None:
            parts.append(f"random-init={self.init_seed}")
        else:
            if self._weights_hash is None:
                self._weights_hash = file_sha256(path)
            parts.append(f"sha256={self._weights_hash}")
        if self.dtype != "fp32":
            parts.append(self.dtype)
        return "/".join(parts)

    def describe(self) -> dict[str, object]:
        info = super().describe()
        info["weights"] = _weights_text(self.weights_path, self.weights_url, self.init_seed)
        return info

    def check_timestep(self, timestep: int) -> int:
        if isinstance(timestep, bool) or timestep != 0:
            raise ConfigError(
                f"backbone {self.name!r} is deterministic (no noise): time step must be 0, got {timestep!r}"
            )
        return 0

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """Harness frames in [-1, 1] -> DINO's input: RGB in [0, 1] minus mean, over std (per channel)."""
        mean = torch.tensor(DINO_MEAN, device=frames.device).view(1, 3, 1, 1)
        std = torch.tensor(DINO_STD, device=frames.device).view(1, 3, 1, 1)
        return ((frames + 1.0) / 2.0 - mean) / std

    @torch.no_grad()
    def extract(
        self,
        frames: torch.Tensor,
        *,
        timestep: int,
        layers: list[LayerKey],
        ensemble_size: int,
        seed: int,
        sequence: str,
        frame_indices: list[int],
    ) -> dict[LayerKey, torch.Tensor]:
        del seed, sequence  # nothing random
        self.check_timestep(timestep)
        if ensemble_size != 1:
            raise ConfigError(
                f"backbone {self.name!r} is deterministic (no noise): ensemble size must be 1, "
                f"got {ensemble_size}"
            )
        keys = list(dict.fromkeys(int(self.resolve_layer(layer)) for layer in layers))
        if not keys:
            raise ConfigError(f"no layers requested from backbone {self.name!r}")
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ConfigError(f"frames must be (B, 3, H, W), got {tuple(frames.shape)}")
        batch, _, height, width = frames.shape
        if len(frame_indices) != batch:
            raise ConfigError(f"{len(frame_indices)} frame indices for a batch of {batch} frames")
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ConfigError(
                f"frame size {height}x{width} is not a multiple of the patch size {patch} "
                f"of backbone {self.name!r}"
            )
        net = self.net
        x = self.normalize(frames.to(self.device, torch.float32))
        reduced = self.dtype != "fp32"
        with torch.autocast(self.device.type, dtype=_DTYPES[self.dtype], enabled=reduced):
            features = net.block_features(x, keys)
        return {key: features[key].float().cpu() for key in keys}


def _layer_table(config: ViTConfig | XCiTConfig) -> dict[LayerKey, LayerInfo]:
    """Every block gives embed_dim channels on the patch grid (stride = patch size)."""
    return {index: LayerInfo(index, config.embed_dim, config.patch_size) for index in range(config.depth)}


def _weights_text(path: Path | None, url: str | None, init_seed: int) -> str:
    if path is None:
        return f"none: random initialisation (seed {init_seed})"
    if url is None:
        return str(path)
    return f"{path} (downloaded from {url} if missing)"


_OPTIONS = ("dtype", "weights_dir", "init_seed", "default_layer")


def _factory(name: str, config: ViTConfig | XCiTConfig) -> Callable[..., DinoBackbone]:
    def factory(
        weights: str | None = None, device: torch.device | str = "cpu", **options: object
    ) -> DinoBackbone:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for backbone {name!r}; known: {', '.join(_OPTIONS)}"
            )
        return DinoBackbone(config, weights, device, name=name, **options)  # type: ignore[arg-type]

    def describe_static() -> dict[str, object]:
        """What ``describe`` says, from the architecture alone: no network is built, nothing is read."""
        published = PUBLISHED_WEIGHTS.get(config.preset)
        if published is None:
            where = _weights_text(None, None, 0)
        else:
            where = _weights_text(weights_dir(None) / published.filename, published.url, 0)
        return {
            "name": name,
            "default_timestep": 0,
            "default_layer": config.depth - 1,
            "layers": [
                {"layer": info.key, "channels": info.channels, "stride": info.stride}
                for info in _layer_table(config).values()
            ],
            "weights": where,
        }

    factory.describe_static = describe_static  # type: ignore[attr-defined]
    factory.__name__ = f"load_{name.replace('-', '_')}"
    kind = "published weights" if config.preset in PUBLISHED_WEIGHTS else "seeded random weights"
    factory.__doc__ = f"DINO {config.preset} ({kind})."
    return factory


#: registry name -> architecture
DINO_BACKBONES: dict[str, ViTConfig | XCiTConfig] = {
    "dino-vits8": VIT_S8,
    "dino-vitb8": VIT_B8,
    "dino-xcits8": XCIT_S12_P8,
    "dino-vits8-tiny": VIT_S8_TINY,
    "dino-vitb8-tiny": VIT_B8_TINY,
    "dino-xcits8-tiny": XCIT_S12_P8_TINY,
}

for _name, _config in DINO_BACKBONES.items():
    register(_name)(_factory(_name, _config))
del _name, _config
