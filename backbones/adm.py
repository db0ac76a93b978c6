"""ADM (guided-diffusion 256x256 unconditional) as a feature backbone.

Registered names:

- ``adm``: the official ``256x256_diffusion_uncond.pt``, looked up in :func:`weights_dir` and downloaded
  there when missing (default time step 30, decoder layer 6).
- ``adm-tiny``: the same architecture at toy size with seeded random weights, so the ADM code path runs in
  tests and smoke runs without a 2 GB download.

The network is built and its weights read only when features are first needed (or on :meth:`load`), so
that listing backbones, asking for their layers or describing them costs nothing.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from backbones import register
from backbones.adm_unet import ADM_256_UNCOND, ADM_TINY, ADMConfig, ADMUNet
from backbones.base import (
    FLOAT32_BYTES,
    Backbone,
    LayerInfo,
    LayerKey,
    MemoryEstimate,
    frame_generator,
    linear_alphas_cumprod,
)
from backbones.errors import ConfigError, HarnessError
from backbones.weights import (
    ensure_weights_file,
    file_sha256,
    read_state_dict,
    weights_location,
)

OFFICIAL_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"
OFFICIAL_FILENAME = "256x256_diffusion_uncond.pt"

#: presets that have published weights: preset -> (file name, URL)
_PUBLISHED: dict[str, tuple[str, str]] = {ADM_256_UNCOND.preset: (OFFICIAL_FILENAME, OFFICIAL_URL)}

#: bump when a code change alters the features a given checkpoint produces (invalidates feature caches)
_IMPLEMENTATION_VERSION = 1

#: the paper's ADM setting: t 30 and layer 6 from diff-zvos docs/EVALUATION.md:36 (the documented ADM
#: command overrides only these); the ensemble of 8 noise draws from src/config/eval.yaml:12, which that
#: command keeps
PAPER_ADM_DEFAULTS = {"default_timestep": 30, "default_layer": 6, "default_ensemble_size": 8}
#: the smoke model: one noise draw keeps it quick (it has no published setting)
#: layer 4 is its first stride-8 block at the level-3 width, where layer 6 sits in the official model
TINY_ADM_DEFAULTS = {"default_timestep": 30, "default_layer": 4, "default_ensemble_size": 1}

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cells(height: int, width: int, rate: int) -> int:
    return math.ceil(height / rate) * math.ceil(width / rate)


def adm_memory_estimate(config: ADMConfig, input_size: tuple[int, int], parameters: int) -> MemoryEstimate:
    """An upper bound of one ADM forward pass per sample, from the architecture alone.

    Held at once: the noised input (with its noise and the clean frame), every encoder output kept for the
    skip connections, and the larger of a ResBlock's temporaries at the finest level and the attention
    weights (heads x tokens^2, three times: the product, its softmax and a contiguous copy for the second
    product) at the finest attended level.
    """
    height, width = input_size
    mc = config.model_channels
    skips = mc * _cells(height, width, 1)
    working = 0
    attention = 0
    rate = 1
    last = len(config.channel_mult) - 1
    for level, mult in enumerate(config.channel_mult):
        channels = mult * mc
        cells = _cells(height, width, rate)
        skips += config.num_res_blocks * channels * cells
        # a decoder ResBlock sees its input concatenated with a skip: at most 2C in, several temporaries
        working = max(working, 8 * 2 * channels * cells)
        if rate in config.attention_rates or level == last:
            heads = channels // config.num_head_channels
            attention = max(attention, 3 * heads * cells * cells + 6 * channels * cells)
        if level != last:
            rate *= 2
            skips += channels * _cells(height, width, rate)
    inputs = 3 * 3 * height * width
    per_sample = FLOAT32_BYTES * (inputs + skips + max(working, attention))
    return MemoryEstimate(weights=FLOAT32_BYTES * parameters, per_frame=0, per_sample=per_sample)


def random_state_dict(config: ADMConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights for ``config``, without touching torch's global RNG.

    Unlike the original initialisation the output convs are not zeroed, so every block contributes and
    tests on the random model see non-trivial features.
    """
    with torch.device("meta"):
        skeleton = ADMUNet(config)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for module_name, module in skeleton.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, torch.nn.GroupNorm):
                value = torch.ones(param.shape) if param_name == "weight" else torch.zeros(param.shape)
            elif param.ndim >= 2:
                fan_in = param[0].numel()
                value = torch.randn(param.shape, generator=generator) / fan_in**0.5
            else:
                value = 0.1 * torch.randn(param.shape, generator=generator)
            state[key] = value
    return state


def _as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    words = {
        "1": True,
        "true": True,
        "yes": True,
        "on": True,
        "0": False,
        "false": False,
        "no": False,
        "off": False,
    }
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    raise ConfigError(f"backbone option {name!r} must be true or false, got {value!r}")


class ADMBackbone(Backbone):
    """Decoder features of an ADM UNet at a noise level, averaged over an ensemble of noise draws."""

    num_train_timesteps = 1000

    def __init__(
        self,
        config: ADMConfig = ADM_256_UNCOND,
        weights: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        *,
        name: str = "adm",
        default_timestep: int = 30,
        default_layer: int = 6,
        default_ensemble_size: int = 8,
        dtype: str = "fp32",
        channels_last: bool | str = False,
        compile: bool | str = False,
        weights_dir: str | os.PathLike[str] | None = None,
        init_seed: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise ConfigError(f"ADM dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.config = config
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = _as_bool("channels_last", channels_last)
        self.compile = _as_bool("compile", compile)
        self.init_seed = init_seed
        self.size_multiple = config.size_multiple
        self.alphas_cumprod = linear_alphas_cumprod(self.num_train_timesteps)
        self.default_timestep = self.check_timestep(default_timestep)
        self.default_layer = min(default_layer, config.num_output_blocks - 1)
        self.default_ensemble_size = self.resolve_ensemble_size(default_ensemble_size)
        self.weights_path, self.weights_url = weights_location(
            f"ADM preset {config.preset!r}", weights, weights_dir, _PUBLISHED.get(config.preset)
        )
        self._net: ADMUNet | None = None
        #: the loaded network's decoder_features, compiled when asked for
        self._run: Callable[..., dict[int, torch.Tensor]] | None = None
        self._weights_hash: str | None = None
        self._parameters: int | None = None

    # -- weights -------------------------------------------------------------------------------------

    def _ensure_weights_file(self) -> Path | None:
        """The checkpoint path, downloading the published file if it is not there yet."""
        if self.weights_path is None:
            return None
        return ensure_weights_file("ADM", self.weights_path, self.weights_url)

    def _read_state_dict(self) -> dict[str, torch.Tensor]:
        path = self._ensure_weights_file()
        if path is None:
            return random_state_dict(self.config, self.init_seed)
        return read_state_dict("ADM", path)

    def _check_state_dict(self, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
        """Fail with one readable message when the checkpoint does not fit the architecture."""
        missing = [key for key in expected if key not in state]
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
        if problems:
            source = self.weights_path or "random init"
            raise HarnessError(
                f"{source} does not match the ADM preset {self.config.preset!r}: " + "; ".join(problems)
            )

    def load(self) -> ADMBackbone:
        """Build the network and read its weights now (otherwise this happens on first use)."""
        if self._net is not None:
            return self
        if self.device.type == "meta":
            raise ConfigError("the ADM backbone cannot run on the meta device")
        with torch.device("meta"):
            net = ADMUNet(self.config)
        state = self._read_state_dict()
        self._check_state_dict(state, net.state_dict())
        state = {key: value.to(torch.float32) for key, value in state.items()}
        net.load_state_dict(state, strict=True, assign=True)
        net = net.eval().requires_grad_(False).to(self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self._net = net
        self._run = torch.compile(net.decoder_features) if self.compile else net.decoder_features
        return self

    @property
    def net(self) -> ADMUNet:
        self.load()
        assert self._net is not None
        return self._net

    # -- Backbone interface -------------------------------------------------------------------------

    def layers(self) -> dict[LayerKey, LayerInfo]:
        return {
            index: LayerInfo(index, channels, stride)
            for index, (channels, stride) in enumerate(self.config.output_block_shapes())
        }

    def identity(self) -> str:
        config_digest = hashlib.sha256(repr(self.config).encode()).hexdigest()[:12]
        parts = [f"adm/{self.config.preset}", f"config={config_digest}", f"impl={_IMPLEMENTATION_VERSION}"]
        path = self._ensure_weights_file()
        if path is None:
            parts.append(f"random-init={self.init_seed}")
        else:
            if self._weights_hash is None:
                self._weights_hash = file_sha256(path)
            parts.append(f"sha256={self._weights_hash}")
        if self.dtype != "fp32":
            parts.append(self.dtype)  # reduced precision changes the features
        return "/".join(parts)

    def estimate_memory(self, input_size: tuple[int, int], layers: list[LayerKey]) -> MemoryEstimate:
        if self._parameters is None:
            with torch.device("meta"):
                self._parameters = sum(p.numel() for p in ADMUNet(self.config).parameters())
        return adm_memory_estimate(self.config, input_size, self._parameters)

    def describe(self) -> dict[str, object]:
        info = super().describe()
        info["preset"] = self.config.preset
        if self.weights_path is None:
            info["weights"] = f"none: random initialisation (seed {self.init_seed})"
        elif self.weights_url is None:
            info["weights"] = str(self.weights_path)
        else:
            info["weights"] = f"{self.weights_path} (downloaded from {self.weights_url} if missing)"
        return info

    @torch.no_grad()
    def unet_features(self, x_t: torch.Tensor, t: int, layers: list[LayerKey]) -> dict[int, torch.Tensor]:
        """Decoder features of already-noised inputs ``x_t`` (N, 3, H, W) at time step ``t``, on the device.

        This is the deterministic core of :meth:`extract`: no noise is drawn here.
        """
        self.check_timestep(t)
        keys = [int(self.resolve_layer(layer)) for layer in layers]
        self.load()
        x_t = x_t.to(self.device, torch.float32)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        steps = torch.full((x_t.shape[0],), t, device=self.device, dtype=torch.int64)
        reduced = self.dtype != "fp32"
        with torch.autocast(self.device.type, dtype=_DTYPES[self.dtype], enabled=reduced):
            assert self._run is not None
            return self._run(x_t, steps, keys)

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
        self.check_timestep(timestep)
        keys = list(dict.fromkeys(int(self.resolve_layer(layer)) for layer in layers))
        if not keys:
            raise ConfigError("no layers requested from the ADM backbone")
        if ensemble_size < 1:
            raise ConfigError(f"ensemble_size must be >= 1, got {ensemble_size}")
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ConfigError(f"frames must be (B, 3, H, W), got {tuple(frames.shape)}")
        batch, _, height, width = frames.shape
        if len(frame_indices) != batch:
            raise ConfigError(f"{len(frame_indices)} frame indices for a batch of {batch} frames")

        # Noise is drawn on the CPU so that the same seed gives the same features on every device.
        noise = torch.stack(
            [
                torch.randn(
                    (ensemble_size, 3, height, width), generator=frame_generator(seed, sequence, index, "cpu")
                )
                for index in frame_indices
            ]
        ).to(self.device)
        alphabar = float(self.alphas_cumprod[timestep])
        x0 = frames.to(self.device, torch.float32)[:, None]
        x_t = (alphabar**0.5 * x0 + (1.0 - alphabar) ** 0.5 * noise).reshape(
            batch * ensemble_size, 3, height, width
        )
        features = self.unet_features(x_t, timestep, keys)
        return {
            key: features[key]
            .float()
            .reshape(batch, ensemble_size, *features[key].shape[1:])
            .mean(dim=1)
            .cpu()
            for key in keys
        }


_OPTIONS = (
    "dtype",
    "channels_last",
    "compile",
    "weights_dir",
    "init_seed",
    "default_timestep",
    "default_layer",
    "default_ensemble_size",
)


def _build(
    config: ADMConfig,
    name: str,
    defaults: dict[str, int],
    weights: str | None,
    device: torch.device | str,
    options: dict[str, object],
) -> ADMBackbone:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for backbone {name!r}; known: {', '.join(_OPTIONS)}"
        )
    options = defaults | options
    return ADMBackbone(config, weights, device, name=name, **options)  # type: ignore[arg-type]


@register("adm")
def official_adm(
    weights: str | None = None, device: torch.device | str = "cpu", **options: object
) -> ADMBackbone:
    """guided-diffusion's 256x256 unconditional model (downloaded on first use)."""
    return _build(ADM_256_UNCOND, "adm", dict(PAPER_ADM_DEFAULTS), weights, device, options)


@register("adm-tiny")
def tiny_adm(
    weights: str | None = None, device: torch.device | str = "cpu", **options: object
) -> ADMBackbone:
    """A toy ADM with random weights; layer 4 (stride 8) is the analogue of the official layer 6."""
    return _build(ADM_TINY, "adm-tiny", dict(TINY_ADM_DEFAULTS), weights, device, options)
