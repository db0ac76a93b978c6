"""The pixel-adaptive CRF of the Training-Free-VOS method against a loop-by-loop version of its equations."""

from __future__ import annotations

import math

import numpy as np
import torch

from harness.methods.training_free_vos.crf import (
    PacCrf,
    PacKernelSpec,
    dual_focal_loss,
    fit_to_first_frame,
    gaussian_window,
)


def brute_force_crf(crf: PacCrf, unary: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Mean field written pixel by pixel, offset by offset, straight from the model's definition."""
    c, h, w = unary.shape
    scales = crf.scales.detach().double().numpy()
    log_q = unary.copy()
    for step in range(crf.steps):
        q = np.exp(log_q - log_q.max(axis=0))
        q /= q.sum(axis=0)
        new = float(crf.unary_weights[step].detach()) * unary
        for k, spec in enumerate(crf.kernels):
            weight = crf.pairwise[step][k].detach().double().numpy()  # (C, C, k*k)
            half = spec.kernel_size // 2
            for y in range(h):
                for x in range(w):
                    fi = np.concatenate([[y / scales[k, 0], x / scales[k, 0]], image[:, y, x] / scales[k, 1]])
                    for dy in range(-half, half + 1):
                        for dx in range(-half, half + 1):
                            py, px = y + dy * spec.dilation, x + dx * spec.dilation
                            if not (0 <= py < h and 0 <= px < w):
                                continue
                            fp = np.concatenate(
                                [[py / scales[k, 0], px / scales[k, 0]], image[:, py, px] / scales[k, 1]]
                            )
                            affinity = math.exp(-0.5 * float(((fi - fp) ** 2).sum()))
                            j = (dy + half) * spec.kernel_size + (dx + half)
                            new[:, y, x] += weight[:, :, j] @ q[:, py, px] * affinity
        log_q = new
    return log_q


def test_vectorised_crf_equals_the_brute_force_loops() -> None:
    rng = np.random.default_rng(0)
    kernels = (
        PacKernelSpec(3, 2, "pairwise", 2.0, 40.0),
        PacKernelSpec(5, 1, "potts", 3.0, 25.0),
        PacKernelSpec(3, 4, "pairwise", 1.5, 60.0),
    )
    crf = PacCrf(3, kernels, steps=3, unary_weight=0.85).double()
    with torch.no_grad():  # break the symmetric initial weights so that every index is exercised
        for step in crf.pairwise:
            for weight in step:
                weight.add_(torch.from_numpy(rng.normal(scale=0.3, size=tuple(weight.shape))))
    unary = 5.0 * np.eye(3)[rng.integers(0, 3, size=(7, 9))].transpose(2, 0, 1) + rng.normal(size=(3, 7, 9))
    image = rng.uniform(0, 255, size=(3, 7, 9))
    ours = crf(torch.from_numpy(unary), torch.from_numpy(image)).detach().numpy()
    np.testing.assert_allclose(ours, brute_force_crf(crf, unary, image), rtol=1e-10, atol=1e-10)


def test_gaussian_window_is_the_released_filler() -> None:
    g = gaussian_window(5)
    assert g[2, 2] == 0.0
    np.testing.assert_allclose(g, g.T)
    r = np.arange(-2, 3)
    full = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / 1.25**2)
    np.testing.assert_allclose(g[0, 0] / g[0, 1], full[0, 0] / full[0, 1], rtol=1e-6)
    assert math.isclose(float(g.sum()), 25.0 * (1.0 - full[2, 2] / full.sum()), rel_tol=1e-6)


def test_crf_removes_isolated_label_noise_inside_a_coloured_region() -> None:
    h, w = 24, 24
    labels = np.zeros((h, w), dtype=np.int64)
    labels[:, 12:] = 1
    image = np.where(labels[None] == 1, 200.0, 30.0).repeat(3, axis=0)
    noisy = labels.copy()
    noisy[5, 3] = 1
    noisy[18, 20] = 0
    unary = 5.0 * np.eye(2)[noisy].transpose(2, 0, 1)
    crf = PacCrf(2, (PacKernelSpec(5, 1, "potts", 8.0, 30.0),), steps=5)
    refined = crf(torch.from_numpy(unary).float(), torch.from_numpy(image).float()).argmax(0).numpy()
    assert (refined == labels).all()
    assert (noisy != labels).sum() == 2


def test_fitting_on_the_first_frame_lowers_the_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[4:12, 4:12] = 1
    image = torch.where(labels[None] == 1, 180.0, 60.0).repeat(3, 1, 1)
    coarse = torch.zeros_like(labels)
    coarse[3:13, 3:13] = 1  # a blob one pixel too large on each side
    unary = 5.0 * torch.nn.functional.one_hot(coarse, 2).permute(2, 0, 1).float()
    crf = PacCrf(2, (PacKernelSpec(3, 1, "potts", 4.0, 30.0),), steps=2)
    with torch.no_grad():
        before = float(dual_focal_loss(crf(unary, image), labels))
    losses = fit_to_first_frame(crf, unary, image, labels, steps=12, lr=0.05, generator=gen)
    assert losses[-1] < 0.8 * before
