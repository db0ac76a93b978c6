"""DINO's Vision Transformer and XCiT, written from the published architectures.

Why not timm: timm needs torchvision, and no torchvision wheel imports beside the project's CPU torch
(PyPI's build fails with "operator torchvision::nms does not exist"). The two networks are small, so they
are written here, with module and parameter names equal to the keys of the official DINO checkpoints so
that ``load_state_dict(strict=True)`` works on the released files.

- :class:`VisionTransformer` follows facebookresearch/dino ``vision_transformer.py`` (patch embedding
  conv, CLS token, learned position embedding bicubically interpolated to any grid, pre-norm blocks,
  final norm).
- :class:`XCiT` follows facebookresearch/xcit ``xcit.py`` (convolutional patch embedding with batch
  norm, Fourier position encoding, cross-covariance attention blocks with local patch interaction and
  layer scale, class-attention blocks).

Both expose :meth:`block_features`, which returns patch tokens of chosen blocks as (B, C, h, w) grids and
stops after the deepest one requested. Inference only: no dropout, no stochastic depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backbones.errors import ConfigError


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a DINO ViT (dino vision_transformer.py:136-156, vit_small/vit_base at :243-254)."""

    preset: str
    patch_size: int = 8
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    #: training resolution; the position embedding has (img_size // patch_size)**2 + 1 entries
    img_size: int = 224
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"ViT preset {self.preset!r}: embed_dim must be divisible by num_heads")
        if self.depth < 1 or self.img_size % self.patch_size:
            raise ConfigError(f"ViT preset {self.preset!r}: needs depth >= 1 and img_size % patch_size == 0")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class XCiTConfig:
    """Architecture of an XCiT (xcit.py:302-357; xcit_small_12_p8 at :493-499)."""

    preset: str
    patch_size: int = 8
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    cls_attn_layers: int = 2
    #: layer-scale initial value; only shapes matter when weights are loaded
    eta: float = 1.0
    #: class-attention blocks normalise all tokens, not only CLS (xcit.py:203-211)
    tokens_norm: bool = True
    #: channels of the Fourier features before their 1x1 projection (xcit.py:27)
    pos_hidden_dim: int = 32
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.patch_size != 8:
            raise ConfigError(f"XCiT preset {self.preset!r}: only the patch-8 convolutional embedding exists")
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ConfigError(
                f"XCiT preset {self.preset!r}: embed_dim must be divisible by num_heads and by 4"
            )
        if self.depth < 1:
            raise ConfigError(f"XCiT preset {self.preset!r}: needs depth >= 1")


VIT_S8 = ViTConfig("vit_small_p8", embed_dim=384, depth=12, num_heads=6)
VIT_B8 = ViTConfig("vit_base_p8", embed_dim=768, depth=12, num_heads=12)
XCIT_S12_P8 = XCiTConfig("xcit_small_12_p8", embed_dim=384, depth=12, num_heads=8)
#: toy sizes of the same classes, for tests and smoke runs (seeded random weights)
VIT_S8_TINY = ViTConfig("vit_small_p8_tiny", embed_dim=32, depth=3, num_heads=2, img_size=64)
VIT_B8_TINY = ViTConfig("vit_base_p8_tiny", embed_dim=48, depth=4, num_heads=3, img_size=64)
XCIT_S12_P8_TINY = XCiTConfig("xcit_small_12_p8_tiny", embed_dim=32, depth=3, num_heads=2, pos_hidden_dim=8)


def _grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h*w, C) patch tokens in row-major order -> (B, C, h, w)."""
    batch, count, channels = tokens.shape
    if count != height * width:
        raise RuntimeError(f"{count} tokens do not fill a {height}x{width} grid")
    return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's Mlp, which both DINO and XCiT use)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# -- ViT --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention (dino vision_transformer.py:68-92).

    It is computed with ``scaled_dot_product_attention`` (same scale head_dim**-0.5) so that memory-
    efficient kernels are used: at 480x832 the 6240x6240 attention matrix per head is never stored for
    a whole batch at once.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, count, dim = x.shape
        qkv = self.qkv(x).reshape(batch, count, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, count, dim))


class Block(nn.Module):
    """Pre-norm transformer block (dino vision_transformer.py:95-113)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size conv (dino vision_transformer.py:116-131)."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINO's ViT without a classifier head (``num_classes=0`` in dino's hubconf.py: no ``head.*`` keys)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2 + 1, dim))
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """The position embedding for an input of ``height`` x ``width`` pixels.

        Reproduces dino vision_transformer.py:174-194 exactly: unchanged for the training grid, else the
        patch part is resized bicubically with ``scale_factor`` = (grid + 0.1) / training grid (the 0.1
        guards the floor of the output size against rounding; the scale factor itself, not the output
        size, sets the sampling positions, as in the original call).
        """
        base = self.pos_embed.shape[1] - 1
        if num_patches == base and height == width:
            return self.pos_embed
        side = math.sqrt(base)
        dim = self.pos_embed.shape[-1]
        rows = height // self.config.patch_size + 0.1
        cols = width // self.config.patch_size + 0.1
        patch_pos = self.pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=(rows / side, cols / side), mode="bicubic")
        if (patch_pos.shape[-2], patch_pos.shape[-1]) != (int(rows), int(cols)):
            raise RuntimeError(
                f"position embedding resized to {tuple(patch_pos.shape[-2:])}, "
                f"expected {(int(rows), int(cols))}"
            )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], patch_pos), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[CLS] + patch embeddings + position embedding (dino vision_transformer.py:196-207)."""
        height, width = x.shape[-2:]
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
        return tokens + self.interpolate_pos_encoding(tokens.shape[1] - 1, height, width)

    def block_features(self, x: torch.Tensor, blocks: list[int]) -> dict[int, torch.Tensor]:
        """``norm(output of block i)`` without the CLS token, as (B, C, H/p, W/p), for each i in ``blocks``.

        The final norm is applied to every returned block, as dino's ``get_intermediate_layers`` does for
        each of the ``n`` last blocks it returns (vision_transformer.py:225-233); with ``n=1`` (what
        eval_video_segmentation.py:155 uses) that is ``norm(last block)``.
        """
        wanted = set(blocks)
        if not wanted or min(wanted) < 0 or max(wanted) >= len(self.blocks):
            raise ConfigError(f"ViT blocks must be in 0..{len(self.blocks) - 1}, got {sorted(wanted)}")
        patch = self.config.patch_size
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        tokens = self.prepare_tokens(x)
        out: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index in wanted:
                out[index] = _grid(self.norm(tokens)[:, 1:], *grid)
                if len(out) == len(wanted):
                    break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised CLS token (dino vision_transformer.py:209-214)."""
        tokens = self.prepare_tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


# -- XCiT -------------------------------------------------------------------------------------------------


class PositionalEncodingFourier(nn.Module):
    """Sine/cosine features of normalised (y, x) positions, projected to ``dim`` (xcit.py:20-55)."""

    def __init__(self, hidden_dim: int, dim: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.hidden_dim = hidden_dim
        self.temperature = temperature

    def forward(self, height: int, width: int) -> torch.Tensor:
        """(1, dim, height, width); the same for every image, so computed once per batch."""
        device = self.token_projection.weight.device
        eps, scale = 1e-6, 2 * math.pi
        y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device)[:, None].expand(
            height, width
        )
        x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device)[None, :].expand(
            height, width
        )
        y_embed = y_embed / (height + eps) * scale
        x_embed = x_embed / (width + eps) * scale
        dim_t = torch.arange(self.hidden_dim, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos_x = x_embed[:, :, None] / dim_t
        pos_y = y_embed[:, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)
        pos_y = torch.stack((pos_y[:, :, 0::2].sin(), pos_y[:, :, 1::2].cos()), dim=3).flatten(2)
        pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)[None]
        return self.token_projection(pos)


def _conv3x3_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """Stride-2 3x3 conv without bias, then batch norm (xcit.py:58-65; SyncBatchNorm acts as BatchNorm2d
    at inference)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ConvPatchEmbed(nn.Module):
    """Three stride-2 conv/BN stages with GELU between them: stride 8 (xcit.py:68-108, patch 8)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            _conv3x3_bn(3, embed_dim // 4),
            nn.GELU(),
            _conv3x3_bn(embed_dim // 4, embed_dim // 2),
            nn.GELU(),
            _conv3x3_bn(embed_dim // 2, embed_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class LPI(nn.Module):
    """Local patch interaction: depthwise 3x3 conv, GELU, BN, depthwise 3x3 conv (xcit.py:111-141)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, count, dim = x.shape
        x = x.permute(0, 2, 1).reshape(batch, dim, height, width)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(batch, dim, count).permute(0, 2, 1)


class XCA(nn.Module):
    """Cross-covariance attention: a (C/h x C/h) softmax over channels per head (xcit.py:221-257).

    Its cost is linear in the number of tokens, so no token-by-token matrix is ever formed.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, count, dim = x.shape
        qkv = self.qkv(x).reshape(batch, count, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)  # each (B, heads, C/h, N)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        out = (attn @ v).permute(0, 3, 1, 2).reshape(batch, count, dim)
        return self.proj(out)


class XCABlock(nn.Module):
    """XCA, LPI and MLP residual branches, each pre-normed and layer-scaled (xcit.py:264-292)."""

    def __init__(self, config: XCiTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = XCA(dim, config.num_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.norm3 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.local_mp = LPI(dim)
        self.gamma1 = nn.Parameter(config.eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(config.eta * torch.ones(dim))
        self.gamma3 = nn.Parameter(config.eta * torch.ones(dim))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.gamma1 * self.attn(self.norm1(x))
        x = x + self.gamma3 * self.local_mp(self.norm3(x), height, width)
        return x + self.gamma2 * self.mlp(self.norm2(x))


class ClassAttention(nn.Module):
    """Attention of the CLS query over all tokens; other tokens pass through (xcit.py:144-173)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, count, dim = x.shape
        qkv = self.qkv(x).reshape(batch, count, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        cls = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, heads, 1, C/h)
        cls = self.proj(cls.transpose(1, 2).reshape(batch, 1, dim))
        return torch.cat((cls, x[:, 1:]), dim=1)


class ClassAttentionBlock(nn.Module):
    """CaiT-style class-attention block as xcit.py:176-218 writes it (tokens_norm included)."""

    def __init__(self, config: XCiTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = ClassAttention(dim, config.num_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.gamma1 = nn.Parameter(config.eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(config.eta * torch.ones(dim))
        self.tokens_norm = config.tokens_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma1 * self.attn(self.norm1(x))
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat((self.norm2(x[:, :1]), x[:, 1:]), dim=1)
        cls = self.gamma2 * self.mlp(x[:, :1])
        # the original adds the block input to [mlp(cls), patch tokens], so patch tokens are doubled
        return x + torch.cat((cls, x[:, 1:]), dim=1)


class XCiT(nn.Module):
    """XCiT without a classifier head (``num_classes=0`` in dino's hubconf.py, so no ``head.*`` keys)."""

    def __init__(self, config: XCiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = ConvPatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([XCABlock(config) for _ in range(config.depth)])
        self.cls_attn_blocks = nn.ModuleList(
            [ClassAttentionBlock(config) for _ in range(config.cls_attn_layers)]
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.pos_embeder = PositionalEncodingFourier(config.pos_hidden_dim, dim)

    def _patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        tokens, (height, width) = self.patch_embed(x)
        pos = self.pos_embeder(height, width).reshape(1, tokens.shape[-1], -1).transpose(1, 2)
        return tokens + pos, height, width

    def block_features(self, x: torch.Tensor, blocks: list[int]) -> dict[int, torch.Tensor]:
        """``norm(output of XCA block i)`` as (B, C, H/8, W/8) for each i in ``blocks``.

        XCA blocks see only patch tokens (the CLS token joins for the class-attention blocks, which
        update only CLS), so a block's output is the patch grid itself. The final norm is applied as for
        the ViT, so that both families' features are normalised the same way.
        """
        wanted = set(blocks)
        if not wanted or min(wanted) < 0 or max(wanted) >= len(self.blocks):
            raise ConfigError(f"XCiT blocks must be in 0..{len(self.blocks) - 1}, got {sorted(wanted)}")
        tokens, height, width = self._patch_tokens(x)
        out: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            tokens = block(tokens, height, width)
            if index in wanted:
                out[index] = _grid(self.norm(tokens), height, width)
                if len(out) == len(wanted):
                    break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised CLS token after the class-attention blocks (xcit.py:377-398)."""
        tokens, height, width = self._patch_tokens(x)
        for block in self.blocks:
            tokens = block(tokens, height, width)
        tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
        for block in self.cls_attn_blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


Network = VisionTransformer | XCiT


def build_network(config: ViTConfig | XCiTConfig) -> Network:
    return VisionTransformer(config) if isinstance(config, ViTConfig) else XCiT(config)


def random_state_dict(config: ViTConfig | XCiTConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights in the official key layout, without touching torch's global RNG.

    Norms start as identities, batch-norm statistics as (0, 1), layer scales and XCA temperatures at 1;
    matrices are scaled by 1/sqrt(fan-in) and the position embedding and CLS token are unit-scale noise,
    so that interpolating the embedding visibly changes the features.
    """
    with torch.device("meta"):
        skeleton = build_network(config)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for module_name, module in skeleton.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            shape = param.shape
            if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)) or name.startswith(
                ("gamma", "temperature")
            ):
                value = torch.ones(shape) if name != "bias" else torch.zeros(shape)
            elif name in ("pos_embed", "cls_token"):
                value = torch.randn(shape, generator=generator)
            elif param.ndim >= 2:
                value = torch.randn(shape, generator=generator) / param[0].numel() ** 0.5
            else:
                value = 0.1 * torch.randn(shape, generator=generator)
            state[prefix + name] = value
        for name, buffer in module.named_buffers(recurse=False):
            if name == "running_var":
                state[prefix + name] = torch.ones(buffer.shape)
            elif name == "num_batches_tracked":
                state[prefix + name] = torch.zeros((), dtype=torch.long)
            else:
                state[prefix + name] = torch.zeros(buffer.shape)
    return state
