"""Mixtures of von Mises-Fisher distributions on the unit sphere, fitted by EM, batched over M mixtures.

Training-Free-VOS keeps, per object, M = 10 mixtures that differ in their number of components and
classifies a pixel by the best component of any of them. Everything here works on tensors of shape
(M, K, ...) with a boolean ``active`` mask, so that mixtures of different sizes share one batched
computation. Functions of the concentration (Bessel-function ratios, normalisers) are evaluated in
float64 on the (M, K) parameters only: they are small, and the cancellations in them need the precision
in 400+ dimensions. The per-pixel work (dot products, soft-max) stays in the features' dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: largest concentration the M-step may return (the released code clamps there too: models_new.py:548)
MAX_KAPPA = 9000.0
#: smallest concentration (a component that has collapsed to the uniform distribution)
MIN_KAPPA = 1e-6


def _debye_log_iv(v: float, x64: Tensor) -> Tensor:
    """Debye's uniform asymptotic expansion of log I_v(x) (DLMF 10.41.3, terms to U_4); float64."""
    z = x64 / v
    root = torch.sqrt(1.0 + z * z)
    eta = root + torch.log(z / (1.0 + root))
    p = 1.0 / root
    p2 = p * p
    u1 = p * (3.0 - 5.0 * p2) / 24.0
    u2 = p2 * (81.0 - 462.0 * p2 + 385.0 * p2 * p2) / 1152.0
    u3 = p * p2 * (30375.0 - 369603.0 * p2 + 765765.0 * p2**2 - 425425.0 * p2**3) / 414720.0
    u4 = (
        p2
        * p2
        * (4465125.0 - 94121676.0 * p2 + 349922430.0 * p2**2 - 446185740.0 * p2**3 + 185910725.0 * p2**4)
        / 39813120.0
    )
    series = 1.0 + u1 / v + u2 / v**2 + u3 / v**3 + u4 / v**4
    return v * eta - 0.5 * math.log(2.0 * math.pi * v) - 0.5 * torch.log(root) + torch.log(series)


#: orders at or above this use Debye's expansion directly; lower ones recur down from it
_DEBYE_MIN_ORDER = 20.0


def log_bessel_iv(order: float, x: Tensor) -> Tensor:
    """log I_order(x) for order >= 0 and x > 0, in float64, without overflow (I_223(9000) ~ 1e3900).

    Debye's uniform asymptotic expansion, exact in the limit of large order (the regime of 400+-dimensional
    features), at orders >= 20; lower orders recur down from there with I_{k-1} = I_{k+1} + (2k/x) I_k
    (stable downwards), carried as log I_k and the ratio I_{k+1}/I_k. Relative error < 1e-7 against
    mpmath (tests/test_vmf.py).
    """
    if order < 0.0:
        raise ValueError(f"log_bessel_iv needs a non-negative order (got {order})")
    x64 = x.to(torch.float64).clamp_min(1e-300)
    shift = max(0, math.ceil(_DEBYE_MIN_ORDER - order))
    top = order + shift
    log_iv = _debye_log_iv(top, x64)
    if shift == 0:
        return log_iv
    ratio = torch.exp(_debye_log_iv(top + 1.0, x64) - log_iv)  # I_{k+1} / I_k at k = top
    for step in range(shift):
        k = top - step
        factor = ratio + 2.0 * k / x64  # I_{k-1} / I_k
        log_iv = log_iv + torch.log(factor)
        ratio = 1.0 / factor
    return log_iv


def log_vmf_normalizer(kappa: Tensor, dim: int) -> Tensor:
    """log C_d(kappa), the log normaliser of the vMF density C_d(kappa) exp(kappa mu.x) on S^{d-1}
    (float64): (d/2 - 1) log kappa - (d/2) log 2 pi - log I_{d/2-1}(kappa)."""
    k = kappa.to(torch.float64).clamp_min(MIN_KAPPA)
    v = dim / 2.0 - 1.0
    return v * torch.log(k) - (dim / 2.0) * math.log(2.0 * math.pi) - log_bessel_iv(v, k)


def mean_resultant_length(kappa: Tensor, dim: int) -> Tensor:
    """A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa), the expected cosine to the mean (float64)."""
    k = kappa.to(torch.float64).clamp_min(MIN_KAPPA)
    v = dim / 2.0 - 1.0
    return torch.exp(log_bessel_iv(v + 1.0, k) - log_bessel_iv(v, k))


def estimate_kappa(resultant: Tensor, dim: int, newton_steps: int = 3) -> Tensor:
    """The maximum-likelihood concentration for a mean resultant length R: solves A_d(kappa) = R.

    Starts from Banerjee et al.'s closed form (R d - R^3) / (1 - R^2) (what the released code stops at,
    models_new.py:548) and refines it with Newton steps (Sra 2012), so that the M-step is exact and EM's
    log-likelihood cannot decrease. Returned in float64, clamped to [MIN_KAPPA, MAX_KAPPA].
    """
    r = resultant.to(torch.float64).clamp(1e-9, 1.0 - 1e-12)
    kappa = ((r * dim - r**3) / (1.0 - r * r)).clamp(MIN_KAPPA, MAX_KAPPA)
    for _ in range(newton_steps):
        a = mean_resultant_length(kappa, dim)
        slope = 1.0 - a * a - (dim - 1.0) / kappa * a
        step = (a - r) / torch.where(slope.abs() > 1e-300, slope, torch.full_like(slope, 1e-300))
        kappa = (kappa - step).clamp(MIN_KAPPA, MAX_KAPPA)
    return kappa


@dataclass
class VmfMixtures:
    """M mixtures of up to K vMF components in R^D; component k of mixture m exists where active[m, k]."""

    #: (M, K) log mixture weights, -inf where inactive; each row log-sums to 0
    log_weights: Tensor
    #: (M, K, D) unit mean directions
    means: Tensor
    #: (M, K) concentrations
    kappas: Tensor
    #: (M, K) bool
    active: Tensor

    @property
    def dim(self) -> int:
        return int(self.means.shape[-1])

    def log_normalizers(self) -> Tensor:
        return log_vmf_normalizer(self.kappas, self.dim).to(self.means.dtype)


@dataclass
class SufficientStats:
    """Soft counts and responsibility-weighted sums of one or more frames' points, per component."""

    #: (M, K) sum of responsibilities
    mass: Tensor
    #: (M, K, D) sum of responsibility-weighted points
    weighted_sum: Tensor

    def __add__(self, other: SufficientStats) -> SufficientStats:
        return SufficientStats(self.mass + other.mass, self.weighted_sum + other.weighted_sum)

    def scaled(self, factor: float) -> SufficientStats:
        return SufficientStats(self.mass * factor, self.weighted_sum * factor)


@dataclass
class EmResult:
    mixtures: VmfMixtures
    #: total log-likelihood of the points (summed over the M mixtures) before each M-step
    log_likelihoods: list[float] = field(default_factory=list)
    #: the statistics of the points under the responsibilities of the last E-step
    stats: SufficientStats | None = None


def component_log_likelihoods(mix: VmfMixtures, points: Tensor, allowed: Tensor | None = None) -> Tensor:
    """(M, N, K): log alpha_mk + log vMF(x_n; mu_mk, kappa_mk); -inf for inactive or disallowed pairs.

    ``allowed`` (M, N, K) bool restricts which component may explain which point (the spatial gate).
    """
    dots = torch.einsum("nd,mkd->mnk", points, mix.means)
    scores = (mix.kappas.to(points.dtype)[:, None, :] * dots) + (
        mix.log_normalizers() + mix.log_weights.to(points.dtype)
    )[:, None, :]
    blocked = ~mix.active[:, None, :]
    if allowed is not None:
        blocked = blocked | ~allowed
    return scores.masked_fill(blocked, -math.inf)


def _responsibilities(joint: Tensor) -> tuple[Tensor, Tensor]:
    """Posterior over components and per-point log-likelihood; points no component may explain get
    zero responsibility and contribute nothing."""
    point_ll = torch.logsumexp(joint, dim=-1)  # (M, N)
    finite = torch.isfinite(point_ll)
    resp = torch.exp(joint - torch.where(finite, point_ll, torch.zeros_like(point_ll))[..., None])
    resp = torch.where(finite[..., None], resp, torch.zeros_like(resp))
    return resp, torch.where(finite, point_ll, torch.zeros_like(point_ll))


def stats_of(points: Tensor, resp: Tensor) -> SufficientStats:
    return SufficientStats(resp.sum(dim=1), torch.einsum("mnk,nd->mkd", resp, points))


def m_step(mix: VmfMixtures, stats: SufficientStats, min_mass: float = 1e-6) -> VmfMixtures:
    """Maximum-likelihood parameters from the statistics; components without mass keep their
    parameters (and their weight goes towards 0 with their mass)."""
    norms = torch.linalg.vector_norm(stats.weighted_sum, dim=-1)
    has_mass = (stats.mass > min_mass) & (norms > 0) & mix.active
    means = torch.where(
        has_mass[..., None], stats.weighted_sum / norms.clamp_min(1e-30)[..., None], mix.means
    )
    resultant = (norms / stats.mass.clamp_min(1e-30)).clamp(0.0, 1.0)
    kappas = torch.where(has_mass, estimate_kappa(resultant, mix.dim).to(mix.kappas.dtype), mix.kappas)
    mass = torch.where(
        mix.active, stats.mass.to(torch.float64) + 1e-12, torch.zeros_like(stats.mass, dtype=torch.float64)
    )
    log_weights = torch.log(mass) - torch.log(mass.sum(dim=1, keepdim=True))
    return VmfMixtures(log_weights.to(mix.log_weights.dtype), means, kappas, mix.active)


def init_mixtures(
    points: Tensor,
    component_counts: Sequence[int],
    max_components: int,
    generator: torch.Generator,
    init_slice: slice = slice(None),
) -> VmfMixtures:
    """M mixtures with the given numbers of active components, means placed by farthest-point sampling
    on ``points[:, init_slice]`` (the position part in the method), starting from one random point per
    mixture; equal weights, kappa 1. models_new.py:32-47 picks the point with the least *summed*
    cosine to the chosen means instead of the least *largest* one: that favours points opposite the
    first mean over a third, separate cluster (the d=16 recovery test of tests/test_vmf.py fails with
    it), so we take the usual farthest point."""
    n, dim = points.shape
    m = len(component_counts)
    k_max = max_components
    if not all(1 <= c <= k_max for c in component_counts):
        raise ValueError(f"component counts {list(component_counts)} must lie in 1..{k_max}")
    part = torch.nn.functional.normalize(points[:, init_slice], dim=-1)
    first = torch.randint(0, n, (m,), generator=generator, device="cpu").to(points.device)
    chosen = [first]
    nearest = part @ part[first].T  # (N, M): cosine to the closest mean chosen so far
    for _ in range(1, k_max):
        nxt = nearest.argmin(dim=0)  # (M,)
        chosen.append(nxt)
        nearest = torch.maximum(nearest, part @ part[nxt].T)
    index = torch.stack(chosen, dim=1)  # (M, K)
    means = torch.nn.functional.normalize(points[index], dim=-1)
    active = (
        torch.arange(k_max, device=points.device)[None, :]
        < torch.tensor(list(component_counts), device=points.device)[:, None]
    )
    counts = active.sum(dim=1, keepdim=True).to(points.dtype)
    log_weights = torch.where(active, -torch.log(counts).expand(m, k_max), torch.full_like(counts, -math.inf))
    kappas = torch.ones(m, k_max, dtype=points.dtype, device=points.device)
    return VmfMixtures(log_weights, means, kappas, active)


def initial_responsibilities(
    mix: VmfMixtures, points: Tensor, init_slice: slice = slice(None), sharpness: float = 1.0
) -> Tensor:
    """The first E-step of a fit from scratch: a soft assignment by ``sharpness`` x cosine on
    ``init_slice`` alone (models_new.py:272-277: the first iteration scores components by the plain
    position dot product, i.e. sharpness 1; large values give k-means' hard assignment)."""
    part = torch.nn.functional.normalize(points[:, init_slice], dim=-1)
    centres = torch.nn.functional.normalize(mix.means[..., init_slice], dim=-1)
    scores = sharpness * torch.einsum("nd,mkd->mnk", part, centres) + mix.log_weights[:, None, :]
    scores = scores.masked_fill(~mix.active[:, None, :], -math.inf)
    return torch.softmax(scores, dim=-1)


def fit_em(
    mix: VmfMixtures,
    points: Tensor,
    max_iters: int,
    tol: float,
    prior: SufficientStats | None = None,
    allowed: Tensor | None = None,
    start_responsibilities: Tensor | None = None,
    min_iters: int = 4,
) -> EmResult:
    """EM on ``points`` (N, D unit rows) for all M mixtures at once.

    ``prior`` statistics (earlier frames, already weighted) are added to every M-step: the streaming
    update. Stops when the relative change of the total log-likelihood falls below ``tol`` (after
    ``min_iters`` iterations, like main_seg's loop, models_new.py:511-532) or after ``max_iters``.
    ``start_responsibilities`` replaces the first E-step (the position-only assignment of a fresh fit).
    """
    result = EmResult(mix)
    previous = -math.inf
    stats: SufficientStats | None = None
    for step in range(max_iters):
        joint = component_log_likelihoods(result.mixtures, points, allowed)
        resp, point_ll = _responsibilities(joint)
        total = float(point_ll.sum())
        result.log_likelihoods.append(total)
        if step == 0 and start_responsibilities is not None:
            resp = start_responsibilities
        stats = stats_of(points, resp)
        if step >= min_iters and abs(total - previous) <= tol * max(abs(previous), 1e-30):
            break
        previous = total
        result.mixtures = m_step(result.mixtures, stats if prior is None else stats + prior)
    result.stats = stats
    return result
