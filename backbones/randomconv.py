"""A weight-free built-in backbone: a small convolutional net with seeded random weights.

It needs no download, so the whole pipeline runs end to end on any machine. Its "time step" adds
noise to the input exactly as a diffusion backbone would (linear beta schedule), so the extraction path
and the ensemble are exercised too. Random conv features are a reasonable colour/texture descriptor.
"""

from __future__ import annotations

import torch
from torch import nn

from backbones import register
from backbones.base import Backbone, LayerInfo, LayerKey, frame_generator, linear_alphas_cumprod


@register("random-conv")
class RandomConvBackbone(Backbone):
    """Three stride-2 conv stages (layers 0, 1, 2 at strides 2, 4, 8) with fixed random weights."""

    name = "random-conv"
    default_timestep = 0
    default_layer = 2
    size_multiple = 8

    def __init__(
        self,
        weights: str | None = None,
        device: torch.device | None = None,
        *,
        width: int = 32,
        init_seed: int = 0,
    ) -> None:
        device = device or torch.device("cpu")
        del weights  # nothing to load
        generator = torch.Generator().manual_seed(init_seed)
        channels = [3, width, width * 2, width * 4]
        stages = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / (3 * c_in) ** 0.5)
                conv.bias.zero_()
            stages.append(nn.Sequential(conv, nn.GELU()))
        self.stages = nn.ModuleList(stages).to(device).eval()
        self.device = device
        self.width = width
        self.init_seed = init_seed
        self.alphas_cumprod = linear_alphas_cumprod(self.num_train_timesteps)

    def layers(self) -> dict[LayerKey, LayerInfo]:
        return {i: LayerInfo(i, self.width * 2**i, 2 ** (i + 1)) for i in range(3)}

    def identity(self) -> str:
        return f"random-conv/width={self.width}/init_seed={self.init_seed}"

    @torch.no_grad()
    def unet_features(
        self, x_t: torch.Tensor, t: int, layers: list[LayerKey]
    ) -> dict[LayerKey, torch.Tensor]:
        del t
        wanted = {self.resolve_layer(layer) for layer in layers}
        out: dict[LayerKey, torch.Tensor] = {}
        h = x_t
        for index, stage in enumerate(self.stages):
            h = stage(h)
            if index in wanted:
                out[index] = h
            if len(out) == len(wanted):
                break
        return out

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
        keys = [self.resolve_layer(layer) for layer in layers]
        frames = frames.to(self.device, torch.float32)
        alphabar = float(self.alphas_cumprod[timestep])
        per_frame: dict[LayerKey, list[torch.Tensor]] = {key: [] for key in keys}
        for i, frame_index in enumerate(frame_indices):
            generator = frame_generator(seed, sequence, frame_index, self.device)
            x0 = frames[i : i + 1].expand(ensemble_size, -1, -1, -1)
            eps = torch.randn(x0.shape, generator=generator, device=self.device)
            x_t = alphabar**0.5 * x0 + (1 - alphabar) ** 0.5 * eps if timestep > 0 else x0
            feats = self.unet_features(x_t, timestep, keys)
            for key in keys:
                mean = feats[key].mean(dim=0, keepdim=True).float().cpu()
                per_frame[key].append(mean)
        return {key: torch.cat(parts, dim=0) for key, parts in per_frame.items()}
