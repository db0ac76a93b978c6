"""The vMF mixture EM of the Training-Free-VOS method: normalisers, the M-step and EM itself."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from harness.methods.training_free_vos.vmf import (
    component_log_likelihoods,
    estimate_kappa,
    fit_em,
    init_mixtures,
    initial_responsibilities,
    log_bessel_iv,
    log_vmf_normalizer,
    mean_resultant_length,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small ops: on a shared CPU, one intra-op thread is much faster than several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sample_vmf(mean: np.ndarray, kappa: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws from vMF(mean, kappa) on S^{d-1} by Wood's (1994) rejection sampler."""
    d = mean.shape[0]
    b = (-2.0 * kappa + math.sqrt(4.0 * kappa**2 + (d - 1.0) ** 2)) / (d - 1.0)
    x0 = (1.0 - b) / (1.0 + b)
    c = kappa * x0 + (d - 1.0) * math.log(1.0 - x0 * x0)
    w = np.empty(0)
    while w.size < n:
        z = rng.beta((d - 1) / 2.0, (d - 1) / 2.0, size=2 * n)
        cand = (1.0 - (1.0 + b) * z) / (1.0 - (1.0 - b) * z)
        u = rng.uniform(size=2 * n)
        keep = kappa * cand + (d - 1.0) * np.log(1.0 - x0 * cand) - c >= np.log(u)
        w = np.concatenate([w, cand[keep]])
    w = w[:n]
    v = rng.normal(size=(n, d - 1))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    samples = np.concatenate([w[:, None], np.sqrt(1.0 - w * w)[:, None] * v], axis=1)
    # Householder reflection taking e1 to the mean
    e1 = np.zeros(d)
    e1[0] = 1.0
    u_vec = e1 - mean
    if np.linalg.norm(u_vec) < 1e-12:
        return samples
    u_vec /= np.linalg.norm(u_vec)
    return samples - 2.0 * (samples @ u_vec)[:, None] * u_vec[None, :]


def exact_log_iv(order: float, x: float) -> float:
    mpmath.mp.dps = 40
    return float(mpmath.log(mpmath.besseli(order, x)))


@pytest.mark.parametrize("dim", [2, 3, 8, 16, 64, 448, 1024])
@pytest.mark.parametrize("kappa", [1e-3, 0.5, 10.0, 200.0, 1000.0, 9000.0])
def test_log_bessel_matches_mpmath_at_high_dimension_and_concentration(dim: int, kappa: float) -> None:
    order = dim / 2.0 - 1.0
    ours = float(log_bessel_iv(order, torch.tensor([kappa], dtype=torch.float64))[0])
    exact = exact_log_iv(order, kappa)
    assert ours == pytest.approx(exact, rel=1e-7, abs=1e-7)


def test_normalizer_integrates_the_density_to_one_on_the_circle_and_sphere() -> None:
    """Closed forms at d=8: C_d from our normaliser against mpmath's direct formula; and the derivative
    identity d/dkappa log C_d = -A_d(kappa) that the M-step relies on."""
    for dim in (8, 448):
        for kappa in (0.3, 50.0, 3000.0):
            k = torch.tensor([kappa], dtype=torch.float64)
            v = dim / 2.0 - 1.0
            exact = v * math.log(kappa) - dim / 2.0 * math.log(2 * math.pi) - exact_log_iv(v, kappa)
            assert float(log_vmf_normalizer(k, dim)[0]) == pytest.approx(exact, rel=1e-7, abs=1e-6)
            h = 1e-4 * kappa
            slope = (float(log_vmf_normalizer(k + h, dim)[0]) - float(log_vmf_normalizer(k - h, dim)[0])) / (
                2 * h
            )
            assert slope == pytest.approx(-float(mean_resultant_length(k, dim)[0]), rel=1e-5, abs=1e-8)


def test_normalizer_is_finite_where_the_bessel_function_overflows_or_underflows() -> None:
    kappas = torch.tensor([1e-6, 1e-2, 1.0, 1e2, 1e3, 9e3], dtype=torch.float64)
    assert torch.isfinite(log_vmf_normalizer(kappas, 4096)).all()


@pytest.mark.parametrize("dim", [16, 448])
def test_estimate_kappa_inverts_the_mean_resultant_length(dim: int) -> None:
    kappas = torch.tensor([0.5, 5.0, 80.0, 700.0, 4000.0], dtype=torch.float64)
    recovered = estimate_kappa(mean_resultant_length(kappas, dim), dim)
    torch.testing.assert_close(recovered, kappas, rtol=1e-6, atol=1e-6)


def _mixture_samples(
    dim: int, kappas: list[float], weights: list[float], n: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(kappas), dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    counts = rng.multinomial(n, weights)
    points = np.concatenate([sample_vmf(means[k], kappas[k], counts[k], rng) for k in range(len(kappas))])
    return points, means, counts / n


def _fit(points: np.ndarray, k: int, iters: int = 200, models: int = 2):
    x = torch.from_numpy(points).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    mix = init_mixtures(x, [k] * models, k, gen)
    start = initial_responsibilities(mix, x, sharpness=100.0)
    return fit_em(mix, x, max_iters=iters, tol=1e-10, start_responsibilities=start)


@pytest.mark.parametrize(("dim", "kappas"), [(16, [60.0, 120.0, 250.0]), (448, [800.0, 1500.0, 2500.0])])
def test_em_recovers_means_kappas_and_weights_of_a_known_mixture(dim: int, kappas: list[float]) -> None:
    weights = [0.5, 0.3, 0.2]
    points, means, empirical = _mixture_samples(dim, kappas, weights, 3000, seed=1)
    result = _fit(points, 3)
    for m in range(2):
        fitted_means = result.mixtures.means[m].numpy()
        match = (fitted_means @ means.T).argmax(axis=1)
        assert sorted(match.tolist()) == [0, 1, 2], "each true component is found once"
        cos = (fitted_means * means[match]).sum(axis=1)
        assert cos.min() > 0.99
        fitted_weights = result.mixtures.log_weights[m].exp().numpy()
        np.testing.assert_allclose(fitted_weights, empirical[match], atol=0.02)
        np.testing.assert_allclose(result.mixtures.kappas[m].numpy(), np.array(kappas)[match], rtol=0.1)


@pytest.mark.parametrize("dim", [16, 448])
def test_em_log_likelihood_never_decreases(dim: int) -> None:
    points, _, _ = _mixture_samples(dim, [30.0, 60.0, 90.0, 20.0], [0.25] * 4, 1500, seed=2)
    # more components than the truth and overlapping clusters: a long, non-trivial climb
    result = _fit(points, 6, iters=60, models=3)
    lls = np.array(result.log_likelihoods[1:])
    assert len(lls) > 5
    assert (np.diff(lls) >= -1e-9 * np.abs(lls[:-1])).all(), np.diff(lls).min()


def test_em_in_float32_at_448_dimensions_stays_finite_and_climbs() -> None:
    points, _, _ = _mixture_samples(448, [400.0, 900.0], [0.6, 0.4], 800, seed=3)
    x = torch.from_numpy(points).float()
    mix = init_mixtures(x, [1, 2, 4], 4, torch.Generator().manual_seed(0))
    result = fit_em(mix, x, max_iters=30, tol=1e-7, start_responsibilities=initial_responsibilities(mix, x))
    assert all(math.isfinite(v) for v in result.log_likelihoods)
    assert result.log_likelihoods[-1] > result.log_likelihoods[1]
    assert torch.isfinite(result.mixtures.kappas).all() and torch.isfinite(result.mixtures.means).all()


def test_inactive_and_disallowed_components_explain_nothing() -> None:
    points, _, _ = _mixture_samples(16, [50.0, 50.0], [0.5, 0.5], 200, seed=4)
    x = torch.from_numpy(points).float()
    mix = init_mixtures(x, [1, 3], 3, torch.Generator().manual_seed(0))
    allowed = torch.ones(2, x.shape[0], 3, dtype=torch.bool)
    allowed[1, :50, 0] = False
    joint = component_log_likelihoods(mix, x, allowed)
    assert torch.isinf(joint[0, :, 1:]).all()
    assert torch.isinf(joint[1, :50, 0]).all() and torch.isfinite(joint[1, 50:, :]).all()
    result = fit_em(mix, x, max_iters=5, tol=0.0, allowed=allowed)
    assert result.stats is not None
    assert float(result.stats.mass[0, 1:].abs().sum()) == 0.0
    assert math.isclose(float(result.mixtures.log_weights[0, 0]), 0.0, abs_tol=1e-6)
