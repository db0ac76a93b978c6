"""A pixel-adaptive conditional random field (PAC-CRF, Su et al. CVPR 2019) refining label maps.

Mean-field inference on a CRF whose pairwise terms connect each pixel with the pixels of a dilated
k x k window, weighted by a Gaussian of the difference of (y, x, r, g, b) "edge" features (the pixel-
adaptive kernel) times a learnable spatial filter, and by a class-compatibility matrix. The released
Training-Free-VOS code builds it from NVIDIA's pacnet (models_new.py:50-154, pacnet/paccrf.py,
pacnet/pac.py); this is our own implementation of the same model with unfold + einsum, on any device.
No maintained package on the registries provides a PAC-CRF (kornia has none; pacnet is not packaged).

One ``step`` of the "loose" CRF (paccrf.py:231-305, every mean-field step with its own weights):
    Q = softmax(logQ);  logQ = w_u * U + sum_kernels sum_c' sum_j W[c, c', j] K(i, i + d j) Q_c'(i + d j)
with K(i, p) = exp(-||f_i - f_p||^2 / 2) and window offsets j (zero outside the image). Potts kernels
have W = +g(j) I (attraction to the same label), the released '4d' kernels start from
W = -g(j) (1 - I) (a penalty for different labels); g is the normalised Gaussian window with a zero
centre (pac.py:614-626), scaled to sum to k^2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class PacKernelSpec:
    """One pairwise kernel: window, dilation, compatibility form and edge-feature scales."""

    kernel_size: int
    dilation: int
    #: "potts": same labels attract; "pairwise": a full class-by-class compatibility (released '4d')
    compatibility: str
    #: y, x divided by this (pixels) ...
    position_scale: float
    #: ... and r, g, b (0-255) by this in the edge features
    color_scale: float


#: models_new.py:50-115 with main_seg.py:65 (kernel_size=5, potts=1.0, p_kernel=5) and pairwise
#: '4d_5_16_1': two class-pair kernels of width 5 at dilations 64 and 16, one Potts kernel of width 5 at
#: dilation 1; every kernel's position scale ((5 - 1) * 16 + 1) / 4 = 16.25, colour scale 30.
RELEASED_KERNELS: tuple[PacKernelSpec, ...] = (
    PacKernelSpec(5, 64, "pairwise", 16.25, 30.0),
    PacKernelSpec(5, 16, "pairwise", 16.25, 30.0),
    PacKernelSpec(5, 1, "potts", 16.25, 30.0),
)


def gaussian_window(width: int) -> np.ndarray:
    """The released filler's spatial filter (pac.py:38-49, 614-626): a Gaussian with sigma width/4,
    normalised to sum width^2, with a zero centre (a pixel sends no message to itself)."""
    sigma = width / 4.0
    r = np.arange(-(width // 2), width // 2 + 1, dtype=np.float64)
    g1 = np.exp(-0.5 * r * r / (sigma * sigma))
    g = np.outer(g1, g1)
    g = g / g.sum() * width * width
    g[width // 2, width // 2] = 0.0
    return g.astype(np.float32)


def edge_features(image: Tensor, position_scale: Tensor | float, color_scale: Tensor | float) -> Tensor:
    """(5, H, W): y / position_scale, x / position_scale, rgb / color_scale for a (3, H, W) 0-255 image."""
    _, h, w = image.shape
    ys = torch.arange(h, dtype=image.dtype, device=image.device)[:, None].expand(h, w)
    xs = torch.arange(w, dtype=image.dtype, device=image.device)[None, :].expand(h, w)
    return torch.cat([torch.stack([ys, xs]) / position_scale, image / color_scale], dim=0)


def _window(x: Tensor, kernel_size: int, dilation: int) -> tuple[Tensor, Tensor]:
    """(C, k*k, H*W) windows of a (C, H, W) map (zero outside) and the (k*k, H*W) in-bounds mask."""
    c, h, w = x.shape
    pad = (kernel_size // 2) * dilation
    cols = F.unfold(x[None], kernel_size, dilation=dilation, padding=pad)[0]
    ones = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
    inside = F.unfold(ones, kernel_size, dilation=dilation, padding=pad)[0]
    return cols.view(c, kernel_size * kernel_size, h * w), inside


def adaptive_kernel(features: Tensor, kernel_size: int, dilation: int) -> Tensor:
    """(k*k, H*W): exp(-||f_i - f_(i + d j)||^2 / 2) for each pixel i and window offset j; 0 outside."""
    c, h, w = features.shape
    cols, inside = _window(features, kernel_size, dilation)
    centre = features.reshape(c, 1, h * w)
    return torch.exp(-0.5 * ((cols - centre) ** 2).sum(dim=0)) * inside


class PacCrf(nn.Module):
    """The loose PAC-CRF: ``steps`` mean-field steps with their own unary weight and kernel weights.

    ``forward(unary, image)`` takes (C, H, W) unary scores (one-hot labels times ``unary_scale`` in the
    method) and a (3, H, W) 0-255 image and returns (C, H, W) log-potentials (``log_Q``, not normalised).
    """

    def __init__(
        self,
        num_classes: int,
        kernels: Sequence[PacKernelSpec] = RELEASED_KERNELS,
        steps: int = 5,
        unary_weight: float = 0.85,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.kernels = tuple(kernels)
        self.steps = steps
        eye = torch.eye(num_classes)
        step_weights = []
        for _ in range(steps):
            per_kernel = []
            for spec in self.kernels:
                g = torch.from_numpy(gaussian_window(spec.kernel_size)).reshape(-1)
                compat = eye if spec.compatibility == "potts" else -(1.0 - eye)
                if spec.compatibility not in ("potts", "pairwise"):
                    raise ValueError(f"unknown compatibility {spec.compatibility!r}")
                per_kernel.append(nn.Parameter(compat[:, :, None] * g[None, None, :]))
            step_weights.append(nn.ParameterList(per_kernel))
        self.pairwise = nn.ModuleList(step_weights)
        self.unary_weights = nn.Parameter(torch.full((steps,), float(unary_weight)))
        self.scales = nn.Parameter(
            torch.tensor([[s.position_scale, s.color_scale] for s in self.kernels], dtype=torch.float32)
        )

    def edge_kernels(self, image: Tensor) -> list[Tensor]:
        return [
            adaptive_kernel(
                edge_features(image, self.scales[i, 0], self.scales[i, 1]), spec.kernel_size, spec.dilation
            )
            for i, spec in enumerate(self.kernels)
        ]

    def forward(self, unary: Tensor, image: Tensor) -> Tensor:
        c, h, w = unary.shape
        kernels = self.edge_kernels(image.to(unary.dtype))
        log_q = unary
        for step in range(self.steps):
            q = torch.softmax(log_q, dim=0)
            log_q = self.unary_weights[step] * unary
            for spec, weight, kernel in zip(self.kernels, self.pairwise[step], kernels, strict=True):
                cols, _ = _window(q, spec.kernel_size, spec.dilation)
                message = torch.einsum("acj,cjn->an", weight.to(q.dtype), cols * kernel[None])
                log_q = log_q + message.view(c, h, w)
        return log_q


def dual_focal_loss(log_q: Tensor, labels: Tensor, eps: float = 1e-5) -> Tensor:
    """The loss the released code fits the CRF with (models_new.py:648-676, arXiv 1909.11932):
    mean over pixels of -sum_c log(1 + eps - (softmax_c - onehot_c)^2)."""
    probs = torch.softmax(log_q, dim=0)
    onehot = F.one_hot(labels.long(), log_q.shape[0]).permute(2, 0, 1).to(probs.dtype)
    return -torch.log(eps + 1.0 - (probs - onehot) ** 2).sum(dim=0).mean()


def fit_to_first_frame(
    crf: PacCrf,
    unary: Tensor,
    image: Tensor,
    labels: Tensor,
    steps: int,
    lr: float = 0.02,
    noise: float = 10.0,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Adam on the CRF's weights so that refining ``unary`` reproduces the first frame's ``labels``
    (models_new.py:582-608: 100 steps, lr 0.02, amsgrad, Gaussian noise of sd 10 on the 0-255 image).
    Returns the loss per step."""
    optimizer = torch.optim.Adam(crf.parameters(), lr=lr, amsgrad=True)
    losses = []
    for _ in range(steps):
        jitter = torch.randn(image.shape, generator=generator, device="cpu").to(image.device, image.dtype)
        noisy = (image + noise * jitter).clamp(0.0, 255.0)
        loss = dual_focal_loss(crf(unary, noisy), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
