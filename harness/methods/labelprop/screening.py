"""Exact top-k with cheap products: screen all keys in bfloat16, recompute the few that matter in float32.

On CPUs with bfloat16 dot-product instructions (AVX512-BF16, AMX) a bfloat16 matrix product runs at about
twice the float32 rate, and the products are most of the propagation's time. Rounding to bfloat16 moves a
dot product of unit vectors by at most a known bound (see ``screening_thresholds``), so:

1. approximate similarities of every (query, key) pair of a block come from one bfloat16 product;
2. each query's k-th largest approximate similarity, minus about twice the bound, is a threshold that
   every key of the exact top k (and every key tied with the exact k-th) reaches;
3. only the keys above some query's threshold are multiplied again in float32, and the exact top-k,
   weights and tie rule of the float32 path run on those.

Why step 2 is safe: the k approximate leaders each have exact >= approx - e >= approx_k - e, so the exact
k-th is >= approx_k - e; a key in the exact top k has exact >= exact_k, hence approx >= exact_k - e >=
approx_k - 2e. The output therefore equals the float32 path's (to its rounding), whatever the data. What
the data decide is the cost: when many keys sit within the margin of the k-th (near-duplicate features),
the block is recomputed in float32 as a whole, and a workspace that sees this often stops screening.
"""

from __future__ import annotations

import threading

import torch

#: unit roundoff of bfloat16 (8 significant bits, round to nearest)
BF16_UNIT_ROUNDOFF = 2.0**-8
_FP32_UNIT_ROUNDOFF = 2.0**-24
#: unit vectors come out of a float32 division: their norms are 1 to within a few float32 roundoffs
_NORM_SLACK = 1e-5

#: a block whose candidates are more than this fraction of its keys is recomputed in float32 whole
MAX_CANDIDATE_FRACTION = 0.35
#: after this many screened blocks, a workspace whose blocks fell back more than half the time stops
#: screening (the bfloat16 product then only adds cost)
FALLBACK_PATIENCE = 32


def screening_thresholds(
    approx_kth: torch.Tensor, query_rounding: torch.Tensor, channels: int, temperature: float
) -> torch.Tensor:
    """Per query, the approximate similarity every key of its exact top k (or tied with its k-th) reaches.

    ``approx_kth`` (Q, 1) is the query's k-th largest approximate similarity, ``query_rounding`` (Q, 1)
    the norm of the query's bfloat16 rounding error, ||q - bf16(q)||. For unit vectors q, k (norms 1 +
    slack) the approximate similarity s~ of a key and the float32 one s^ differ by at most
    a + u' |s~| + 2g, where u is the bfloat16 unit roundoff and u' = u / (1 - u):
    a = ||dq|| ||k|| + ||bf16(q)|| u ||k|| bounds the change from rounding the inputs (a key's rounding
    error is at most u ||k||), u' |s~| the rounding of the bfloat16 result, and g = gamma_C (1 + slack)^2
    (1 + u) the float32 accumulation of either product. With A the approximate k-th: the exact k-th is
    >= A - u'|A| - a - 2g =: L (x - u'|x| grows with x), and a key with s^ >= L has
    s~ + u'|s~| >= L - a - 2g, i.e. s~ >= f^-1(L - a - 2g) with f(x) = x + u'|x|. Keys whose float32
    affinities exp(s^/T) round to the k-th's differ from it by a few float32 roundoffs of the logit,
    T * 1e-6 in similarity at most; that and 1 % of the margin are subtracted on top.
    """
    u = BF16_UNIT_ROUNDOFF
    out_u = u / (1.0 - u)  # round to nearest: |s~ - s| <= u |s| <= u |s~| / (1 - u)
    slack = 1.0 + _NORM_SLACK
    query_error = query_rounding * 1.001  # the norm itself was computed in float32
    inputs = query_error * slack + (slack + query_error) * u * slack
    n_u = channels * _FP32_UNIT_ROUNDOFF
    accumulation = n_u / (1.0 - n_u) * (slack + query_error) * slack * (1.0 + u)
    lower_kth = approx_kth - out_u * approx_kth.abs() - inputs - 2 * accumulation
    target = lower_kth - inputs - 2 * accumulation
    threshold = torch.where(target >= 0, target / (1.0 + out_u), target / (1.0 - out_u))
    return threshold - (approx_kth - threshold) * 0.01 - 1e-6 * max(1.0, temperature)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def screening_available(device: torch.device) -> bool:
    """bfloat16 screening pays off only where bfloat16 products are fast: CPUs with native bf16 support.

    On CUDA the float32 path is used (it was not measured with screening); on a CPU without bf16
    instructions a bfloat16 product is emulated and slower than float32.
    """
    return device.type == "cpu" and cpu_has_native_bf16()


class ScreeningStats:
    """How often screening had to fall back to a whole float32 block, so a workspace can stop trying, and
    what fraction of a block's keys were candidates. The worker threads of a frame record into one."""

    def __init__(self) -> None:
        self.blocks = 0
        self.fallbacks = 0
        self.candidate_fraction_sum = 0.0
        self.candidate_fraction_min = float("inf")
        self.candidate_fraction_max = 0.0
        self._lock = threading.Lock()

    def record(self, fell_back: bool, candidate_fraction: float = 0.0) -> None:
        with self._lock:
            self.blocks += 1
            self.fallbacks += int(fell_back)
            self.candidate_fraction_sum += candidate_fraction
            self.candidate_fraction_min = min(self.candidate_fraction_min, candidate_fraction)
            self.candidate_fraction_max = max(self.candidate_fraction_max, candidate_fraction)

    def summary(self) -> dict[str, float | int | None]:
        """Counts and the mean / min / max candidate fraction of the screened blocks (None if none)."""
        screened = self.blocks > 0
        return {
            "blocks": self.blocks,
            "fallbacks": self.fallbacks,
            "candidate_fraction_mean": self.candidate_fraction_sum / self.blocks if screened else None,
            "candidate_fraction_min": self.candidate_fraction_min if screened else None,
            "candidate_fraction_max": self.candidate_fraction_max if screened else None,
        }

    @property
    def worthwhile(self) -> bool:
        return self.blocks < FALLBACK_PATIENCE or self.fallbacks * 2 <= self.blocks


def candidate_keys(
    approx_key_major: torch.Tensor,
    key_rows: int,
    query_rounding: torch.Tensor,
    channels: int,
    topk: int,
    temperature: float,
    candidates_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys may be in some query's exact top k.

    ``approx_key_major`` (K, Q) holds approximate similarities (-inf outside the windows) of queries whose
    rounding errors are ``query_rounding`` (1, Q); its keys are ``key_rows`` equal runs (one per key row).
    Returns the (K, Q) boolean candidates (written to ``candidates_out``) and the sorted indices of the
    keys that are a candidate of any query.

    The threshold needs only a lower bound of each query's approximate k-th, and the k-th largest of
    group maxima is one: k groups reach it, so k distinct keys do. Grouping the keys that share a column
    and memory frame across the key rows gives the exact k-th whenever the top k lie in k such groups
    (top keys are usually one position in several frames, or neighbours), at a fraction of a full top-k's
    cost; a lower bound only admits more candidates. A query with fewer than k finite keys keeps all of
    them (its bound is -inf).
    """
    n_keys, n_queries = approx_key_major.shape
    group_size = n_keys // key_rows
    if group_size >= topk and key_rows > 1:
        maxima = approx_key_major.view(key_rows, group_size, n_queries).amax(dim=0)
    else:
        maxima = approx_key_major
    k = min(topk, maxima.shape[0])
    kth = torch.topk(maxima, k, dim=0, sorted=False).values.amin(dim=0, keepdim=True).to(torch.float32)
    threshold = screening_thresholds(kth, query_rounding, channels, temperature)
    # a -inf bound keeps every finite key; the lowest finite value never admits -inf (outside the windows)
    lowest = torch.finfo(approx_key_major.dtype).min
    threshold = torch.where(torch.isfinite(kth), threshold, lowest).clamp_min_(lowest)
    # compared in the approximations' dtype, the threshold rounded down (never up: that could drop a key)
    rounded = threshold.to(approx_key_major.dtype)
    rounded = torch.where(
        rounded.to(torch.float32) > threshold, rounded.nextafter(rounded.new_tensor(float("-inf"))), rounded
    )
    candidates = torch.ge(approx_key_major, rounded, out=candidates_out)
    if n_queries % 8 == 0:  # 8 flags at a time: a key is used if any of its int64 words is non-zero
        used = candidates.view(torch.int64).amax(dim=1) > 0
    else:
        used = candidates.any(dim=1)
    return candidates, torch.nonzero(used).squeeze(1)
