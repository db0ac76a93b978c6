"""The interface every feature extractor implements.

A backbone turns a batch of normalised frames ([-1, 1], shape (B, 3, H, W)) into the features of one or
more decoder layers at a noise time step, averaged over an ensemble of noise draws. Noise is drawn from a
generator seeded from (seed, sequence, frame index) so that features are reproducible and independent of
batching.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from backbones.errors import ConfigError

LayerKey = int | str

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class LayerInfo:
    """What a decoder layer produces: channels and output stride relative to the network input."""

    key: LayerKey
    channels: int
    stride: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of feature extraction, in bytes, as an upper bound (float32 activations).

    ``weights`` stay for the whole run; ``per_frame`` is work done once per frame whatever the ensemble
    (SD's VAE encoding); ``per_sample`` is one noise draw's forward pass (held at once for a whole batch).
    """

    weights: int
    per_frame: int
    per_sample: int

    def peak(self, frames: int, ensemble_size: int) -> int:
        """Bytes needed to extract ``frames`` frames of ``ensemble_size`` draws in one pass."""
        return self.weights + frames * self.per_frame + frames * ensemble_size * self.per_sample


def frame_generator(
    seed: int, sequence: str, frame_index: int, device: torch.device | str
) -> torch.Generator:
    """A generator whose state depends only on (seed, sequence, frame index), not on batching."""
    digest = hashlib.sha256(f"{seed}/{sequence}/{frame_index}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def linear_alphas_cumprod(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """alphabar_t of guided-diffusion's linear beta schedule, in float64 as the original computes it."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class Backbone(ABC):
    """A feature extractor. Subclasses set the class attributes and implement the abstract methods."""

    #: registry name, e.g. "adm"
    name: str = ""
    #: number of diffusion training steps; valid time steps are 0 .. num_train_timesteps - 1
    num_train_timesteps: int = 1000
    default_timestep: int = 0
    default_layer: LayerKey = 0
    #: noise draws averaged per frame when the run config leaves ``backbone.ensemble_size`` null
    default_ensemble_size: int = 1
    #: the network input size must be a multiple of this
    size_multiple: int = 32

    device: torch.device = torch.device("cpu")

    @abstractmethod
    def layers(self) -> dict[LayerKey, LayerInfo]:
        """All decoder layers this backbone can return, in network order."""

    @abstractmethod
    def identity(self) -> str:
        """A string that changes whenever the weights or architecture change (used in cache keys)."""

    @abstractmethod
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
        """Features of the requested layers for a batch of frames: {layer: (B, C, h, w) float32 on CPU}.

        ``frames`` is (B, 3, H, W) in [-1, 1]; ``frame_indices[i]`` is the index of ``frames[i]`` in its
        sequence and seeds that frame's noise.
        """

    # -- validation shared by every backbone -------------------------------------------------------

    def resolve_layer(self, layer: LayerKey) -> LayerKey:
        """Map a user-given layer (int, or str such as "6" or "up_ft2") to a key of :meth:`layers`."""
        available = self.layers()
        if layer in available:
            return layer
        if isinstance(layer, str) and layer.lstrip("-").isdigit() and int(layer) in available:
            return int(layer)
        names = ", ".join(str(k) for k in available)
        raise ConfigError(f"backbone {self.name!r} has no layer {layer!r}; available layers: {names}")

    def resolve_ensemble_size(self, ensemble_size: int | None) -> int:
        """``ensemble_size``, or the backbone's published default when it is None."""
        size = self.default_ensemble_size if ensemble_size is None else ensemble_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"ensemble size must be a positive integer, got {size!r}")
        return size

    def estimate_memory(self, input_size: tuple[int, int], layers: list[LayerKey]) -> MemoryEstimate:
        """An upper bound of the memory that extracting ``layers`` at ``input_size`` = (H, W) takes.

        The generic bound counts every decoder layer's output a few times over (skip connections, a block's
        temporaries); backbones with attention or large weights override it.
        """
        height, width = input_size
        table = self.layers()
        activations = sum(
            info.channels * math.ceil(height / info.stride) * math.ceil(width / info.stride)
            for info in table.values()
        )
        return MemoryEstimate(weights=0, per_frame=0, per_sample=4 * FLOAT32_BYTES * activations)

    def check_timestep(self, timestep: int) -> int:
        if not isinstance(timestep, int) or isinstance(timestep, bool):
            raise ConfigError(f"time step must be an integer, got {timestep!r}")
        if not 0 <= timestep < self.num_train_timesteps:
            raise ConfigError(
                f"time step {timestep} is outside [0, {self.num_train_timesteps}) for backbone {self.name!r}"
            )
        return timestep

    def describe(self) -> dict[str, object]:
        """A summary for `harness backbones list`."""
        return {
            "name": self.name,
            "default_timestep": self.default_timestep,
            "default_layer": self.default_layer,
            "default_ensemble_size": self.default_ensemble_size,
            "layers": [
                {"layer": info.key, "channels": info.channels, "stride": info.stride}
                for info in self.layers().values()
            ],
        }
