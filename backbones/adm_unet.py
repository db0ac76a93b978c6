"""The ADM (guided-diffusion) UNet, written from the published architecture description.

Module and parameter names follow the official checkpoints (``time_embed``, ``input_blocks``,
``middle_block``, ``output_blocks``, ``out``) so that ``256x256_diffusion_uncond.pt`` loads with
``load_state_dict(strict=True)``. Only the variant that checkpoint uses is implemented: scale-shift
normalisation, down/up-sampling inside ResBlocks, no class conditioning, no dropout at inference.

:meth:`ADMUNet.decoder_features` stops after the deepest requested decoder block, because the later
(high-resolution) blocks are where most of the compute goes and the features never need them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backbones.errors import ConfigError


@dataclass(frozen=True)
class ADMConfig:
    """Architecture of an ADM UNet (the subset of guided-diffusion flags the 256 uncond model uses)."""

    preset: str
    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    #: 6 = eps and the variance interpolation (learn_sigma)
    out_channels: int = 6
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    #: downsample rates (1, 2, 4, ...) at which blocks get self-attention
    attention_rates: tuple[int, ...] = (8, 16, 32)
    num_head_channels: int = 64
    norm_groups: int = 32

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def size_multiple(self) -> int:
        """Inputs must be divisible by this so that every skip connection lines up."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def num_output_blocks(self) -> int:
        return len(self.channel_mult) * (self.num_res_blocks + 1)

    def __post_init__(self) -> None:
        if not self.channel_mult or self.num_res_blocks < 1 or self.model_channels < 1:
            raise ConfigError(
                f"ADM preset {self.preset!r}: needs channel_mult, num_res_blocks and channels >= 1"
            )
        widths = sorted({self.model_channels * mult for mult in self.channel_mult})
        if any(width % self.norm_groups for width in widths):
            raise ConfigError(
                f"ADM preset {self.preset!r}: widths {widths} do not split into {self.norm_groups} groups"
            )
        last = len(self.channel_mult) - 1
        attended = sorted(
            {
                self.model_channels * mult
                for level, mult in enumerate(self.channel_mult)
                if 2**level in self.attention_rates or level == last
            }
        )
        if any(width % self.num_head_channels for width in attended):
            raise ConfigError(
                f"ADM preset {self.preset!r}: attention widths {attended} do not split into "
                f"heads of {self.num_head_channels} channels"
            )

    def output_block_shapes(self) -> list[tuple[int, int]]:
        """(channels, output stride) of each decoder block, worked out from the settings alone."""
        shapes = []
        for level in reversed(range(len(self.channel_mult))):
            channels = self.channel_mult[level] * self.model_channels
            for index in range(self.num_res_blocks + 1):
                upsampled = level > 0 and index == self.num_res_blocks
                shapes.append((channels, 2 ** (level - 1) if upsampled else 2**level))
        return shapes


#: the settings of the official ``256x256_diffusion_uncond.pt``
ADM_256_UNCOND = ADMConfig(preset="256x256_uncond")

#: a small model of the same family (random weights) for tests and smoke runs. Like the official model it
#: has six levels (strides 1..32, inputs a multiple of 32) and attention only at strides 8, 16 and 32, so a
#: 480p frame costs a few GFLOP and one 6240^2 attention map, not the terabyte of attention at stride 2
ADM_TINY = ADMConfig(
    preset="tiny",
    image_size=64,
    model_channels=16,
    num_res_blocks=1,
    channel_mult=(1, 1, 1, 1, 2, 2),
    attention_rates=(8, 16, 32),
    num_head_channels=16,
    norm_groups=4,
)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) time steps, cosine half first: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    angles = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 whatever the input precision, as the checkpoint was trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class TimestepBlock(nn.Module):
    """A module whose forward takes the time embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class EmbedSequential(nn.Sequential):
    """A sequence of blocks; the time embedding is passed to those that need it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ResBlock(TimestepBlock):
    """Residual block with scale-shift conditioning on the time embedding and optional resampling.

    With ``up``/``down`` the resolution change (nearest 2x / 2x2 average pool, no weights) happens between
    the activation and the first conv, on both the residual branch and the skip branch.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        groups: int,
        *,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock resamples either up or down, not both")
        self.resample = "up" if up else "down" if down else None
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(p=0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # guided-diffusion uses a 1x1 conv when the width changes and no module at all otherwise
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, act, conv = self.in_layers
        h = conv(self._resample(act(norm(x))))
        x = self._resample(x)
        scale, shift = self.emb_layers(emb).to(h.dtype)[..., None, None].chunk(2, dim=1)
        out_norm = self.out_layers[0]
        h = out_norm(h) * (1 + scale) + shift
        for layer in self.out_layers[1:]:
            h = layer(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention over all positions, with the "legacy" per-head qkv channel layout.

    The qkv conv's output channels are grouped head by head, each head holding [q; k; v] of ``head_channels``
    rows: this is the order the official checkpoint's qkv weights are stored in.
    """

    def __init__(self, channels: int, head_channels: int, groups: int) -> None:
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"{channels} channels cannot be split into heads of {head_channels}")
        self.num_heads = channels // head_channels
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        flat = x.reshape(batch, channels, -1)
        qkv = self.qkv(self.norm(flat))
        length = qkv.shape[-1]
        head_channels = channels // self.num_heads
        q, k, v = qkv.reshape(batch * self.num_heads, 3 * head_channels, length).split(head_channels, dim=1)
        # scaling q and k separately by ch^-1/4 keeps the fp16 products in range (matches the original)
        scale = head_channels**-0.25
        weights = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        attended = torch.einsum("bts,bcs->bct", weights, v).reshape(batch, channels, length)
        return (flat + self.proj_out(attended)).reshape(batch, channels, *spatial)


class ADMUNet(nn.Module):
    """The guided-diffusion UNet. ``forward`` returns the (eps, variance) prediction."""

    def __init__(self, config: ADMConfig) -> None:
        super().__init__()
        self.config = config
        mc, groups, emb_dim = config.model_channels, config.norm_groups, config.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def stage(in_ch: int, out_ch: int, rate: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(in_ch, emb_dim, out_ch, groups)]
            if rate in config.attention_rates:
                layers.append(AttentionBlock(out_ch, config.num_head_channels, groups))
            return layers

        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        channels, rate = mc, 1
        last_level = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.input_blocks.append(EmbedSequential(*stage(channels, mult * mc, rate)))
                channels = mult * mc
                skip_channels.append(channels)
            if level != last_level:
                self.input_blocks.append(
                    EmbedSequential(ResBlock(channels, emb_dim, channels, groups, down=True))
                )
                skip_channels.append(channels)
                rate *= 2

        self.middle_block = EmbedSequential(
            ResBlock(channels, emb_dim, channels, groups),
            AttentionBlock(channels, config.num_head_channels, groups),
            ResBlock(channels, emb_dim, channels, groups),
        )

        self.output_blocks = nn.ModuleList()
        #: (channels, output stride) of each output block, in order
        self.output_shapes: list[tuple[int, int]] = []
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for index in range(config.num_res_blocks + 1):
                layers = stage(channels + skip_channels.pop(), mult * mc, rate)
                channels = mult * mc
                if level and index == config.num_res_blocks:
                    layers.append(ResBlock(channels, emb_dim, channels, groups, up=True))
                    rate //= 2
                self.output_blocks.append(EmbedSequential(*layers))
                self.output_shapes.append((channels, rate))

        self.out = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, config.out_channels, 3, padding=1)
        )

    # -- running ---------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        multiple = self.config.size_multiple
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ConfigError(f"ADM input must be (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ConfigError(
                f"ADM input size {x.shape[-2]}x{x.shape[-1]} is not a multiple of {multiple} "
                f"(preset {self.config.preset!r})"
            )

    def _time_embedding(self, t: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        steps = torch.as_tensor(t, device=device).reshape(-1)
        if steps.numel() == 1:
            steps = steps.expand(batch)
        return self.time_embed(timestep_embedding(steps, self.config.model_channels))

    def _encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips: list[torch.Tensor] = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return self.middle_block(h, emb), skips

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Noise (and variance) prediction for ``x`` at time step(s) ``t``: (N, out_channels, H, W)."""
        self._check_input(x)
        emb = self._time_embedding(t, x.shape[0], x.device)
        h, skips = self._encode(x, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def decoder_features(
        self, x_t: torch.Tensor, t: int | torch.Tensor, layers: list[int] | tuple[int, ...]
    ) -> dict[int, torch.Tensor]:
        """Outputs of the requested output blocks; blocks after the deepest requested one are not run."""
        wanted = set(layers)
        count = len(self.output_blocks)
        bad = sorted(layer for layer in wanted if not (isinstance(layer, int) and 0 <= layer < count))
        if bad or not wanted:
            raise ConfigError(f"ADM decoder layers must be integers in 0..{count - 1}, got {list(layers)!r}")
        self._check_input(x_t)
        emb = self._time_embedding(t, x_t.shape[0], x_t.device)
        h, skips = self._encode(x_t, emb)
        features: dict[int, torch.Tensor] = {}
        for index in range(max(wanted) + 1):
            h = self.output_blocks[index](torch.cat([h, skips.pop()], dim=1), emb)
            if index in wanted:
                features[index] = h
        return features
