"""Uplift maths: success rates of treated vs control, and the intervals to read them by.

Pure functions on counts; no I/O, no SQL. Each returns None (or a None field) where the data
cannot support an estimate, so a report shows "not enough data" instead of a made-up number.
Invalid input (negative counts, more successes than trials) is a caller bug and raises
ValueError. Definitions and references: docs/statistics.md.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from statistics import NormalDist

MIN_N = 10
"""Fewest units per group before an uplift is reported (see `newcombe_difference`)."""

PLANNED_N = 1000
"""Default total units (both groups) at which the always-valid interval is tightest."""

SRM_THRESHOLD = 0.001
SRM_MIN_TOTAL = 20
SRM_MIN_EXPECTED = 5.0

DEFAULT_BAND_EDGES: tuple[float, ...] = tuple(i / 10 for i in range(11))


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval for one proportion; None when n == 0.

    Why Wilson and not p ± z·se (Wald): Wald collapses to a zero-width interval at 0/n or n/n
    and undercovers at small n; Wilson stays inside [0, 1] and covers close to nominal
    (Newcombe 1998a, method 3; for 81/263 it gives 0.2553 to 0.3662).
    """
    _check_counts(successes, n)
    if n == 0:
        return None
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0/n the lower limit is exactly 0 and at n/n the upper exactly 1; computed, they come out a
    # rounding error off (2.8e-17 for 0/10), which the Newcombe interval would carry past -1 or 1.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def newcombe_difference(
    s1: int, n1: int, s2: int, n2: int, confidence: float = 0.95, *, min_n: int = MIN_N
) -> tuple[float, float, float] | None:
    """Difference p1 - p2 (treated - control) and Newcombe's hybrid score interval.

    Returns (difference, low, high), or None when either group has fewer than `min_n` units.
    Method 10 of Newcombe (1998b) combines the two Wilson intervals (l_i, u_i):
        low  = d - sqrt((p1 - l1)^2 + (u2 - p2)^2)
        high = d + sqrt((u1 - p1)^2 + (p2 - l2)^2)
    It covers close to nominal even near 0 or 1, where the Wald difference interval fails.

    Why a minimum: every interval here rests on a score/normal approximation, and with a
    handful of units per group an interval is so wide (and its coverage so approximate)
    that printing a number invites a decision the data cannot carry. Below `min_n` per group
    the honest answer is "not enough data".
    """
    _check_counts(s1, n1)
    _check_counts(s2, n2)
    if n1 < max(min_n, 1) or n2 < max(min_n, 1):
        return None
    w1 = wilson_interval(s1, n1, confidence)
    w2 = wilson_interval(s2, n2, confidence)
    assert w1 is not None and w2 is not None  # n1, n2 >= 1
    (l1, u1), (l2, u2) = w1, w2
    p1, p2 = s1 / n1, s2 / n2
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    # The difference lives in [-1, 1]; clamp rounding noise so the interval does too.
    return d, max(-1.0, low), min(1.0, high)


def _rho2(planned_n: float, alpha: float) -> float:
    """Mixture tuning that makes the boundary tightest near `planned_n` units.

    Waudby-Smith et al. (2024), Sec. 2: rho^2 = (-2 log a + log(1 - 2 log a)) / t*, the
    closed-form approximate minimiser of the standard margin at t = t*.
    """
    two_log = -2 * math.log(alpha)
    return (two_log + math.log(1 + two_log)) / planned_n


def _std_margin(t: float, rho2: float, alpha: float) -> float:
    """Two-sided normal-mixture margin for a unit-variance mean after t units."""
    v = t * rho2 + 1
    return math.sqrt(2 * v / (t * t * rho2) * math.log(math.sqrt(v) / alpha))


def sequential_difference_interval(
    s1: int, n1: int, s2: int, n2: int, alpha: float = 0.05, *, planned_n: int = PLANNED_N, min_n: int = MIN_N
) -> tuple[float, float] | None:
    """Always-valid (anytime) 1 - alpha interval for p1 - p2; None below `min_n` per group.

    The fixed 95% interval promises 95% coverage at ONE pre-planned look. Read every day, the
    chance that some look excludes the truth grows well past 5%. This interval is a
    confidence sequence: the chance that it EVER excludes the true difference, over all
    looks, is at most alpha (asymptotically), so it may be read as often as one likes and
    acted on as soon as it excludes 0.

    Method: the asymptotic confidence sequence (AsympCS) of Waudby-Smith, Arbour, Sinha,
    Kennedy & Ramdas, "Time-uniform central limit theory and asymptotic confidence
    sequences", Annals of Statistics 2024 (arXiv:2103.06476), Theorem 2.2 with Robbins'
    normal-mixture boundary:
        mean_t ± sigma_t * sqrt( 2(t rho^2 + 1)/(t^2 rho^2) * log( sqrt(t rho^2 + 1)/alpha ) )
    (this is the form half-width = sqrt((t s^2 r^2 + 1)/(t^2 r^2) log((t s^2 r^2 + 1)/alpha^2))
    with r = rho / sigma: the same boundary, written so that rho does not depend on scale).

    Derivation for two groups. Units arrive one at a time; unit i is treated (A_i = 1) with
    the holdout's fixed probability pi = 1 - holdout. With n = n1 + n2 units and
    d_n = p1_hat - p2_hat,
        n (d_n - d) = sum_i psi_i + R_n,
        psi_i = A_i (Y_i - p1)/pi - (1 - A_i)(Y_i - p2)/(1 - pi),
    i.i.d., mean 0, variance sigma^2 = p1 q1/pi + p2 q2/(1 - pi); R_n comes from n1/n
    wandering around pi and is O(log log n) almost surely (law of the iterated logarithm),
    far inside the o(sqrt(n log n)) that an AsympCS tolerates. So d_n is, time-uniformly,
    the mean of n i.i.d. terms with variance sigma^2, estimated consistently by
        sigma_hat^2 = n (p1~ q1~/n1 + p2~ q2~/n2),   p~ = (s + 1)/(n + 2),
    i.e. n times the usual variance of the difference. (p~ instead of s/n keeps a group
    at 0/n or n/n from claiming zero variance; the change vanishes as n grows, so the
    guarantee is untouched.) t = n, and the half-width is sigma_hat * margin(n).

    Tuning: rho is chosen to make the interval tightest at `planned_n` total units (default
    1000: a rule's holdout accrues to about a hundred controls at that size). It is valid
    at every n whatever rho is; a bad rho only costs width away from planned_n.

    The result is widened to the fixed Newcombe interval at the same confidence if ever
    narrower (an interval valid at all looks is also valid at this one, and a superset of
    a confidence sequence is still one), then clipped to [-1, 1] where the difference lives.
    Assumes the treated share stays roughly fixed (a rule's holdout fraction) and outcomes
    of different units are independent.
    """
    _check_counts(s1, n1)
    _check_counts(s2, n2)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if planned_n < 1:
        raise ValueError(f"planned_n must be >= 1, got {planned_n}")
    fixed = newcombe_difference(s1, n1, s2, n2, 1 - alpha, min_n=min_n)
    if fixed is None:
        return None
    d, fixed_low, fixed_high = fixed
    n = n1 + n2
    t1, t2 = (s1 + 1) / (n1 + 2), (s2 + 1) / (n2 + 2)
    sigma = math.sqrt(n * (t1 * (1 - t1) / n1 + t2 * (1 - t2) / n2))
    half = sigma * _std_margin(n, _rho2(planned_n, alpha), alpha)
    return max(-1.0, min(d - half, fixed_low)), min(1.0, max(d + half, fixed_high))


@dataclass(frozen=True)
class UpliftEstimate:
    """Treated vs control success rates and the uplift between them.

    Rates are None when their group is empty. uplift and all intervals are None unless
    enough_data (both groups have at least min_n units). ci_* is the fixed 95% Newcombe
    interval (one read at a pre-planned size); seq_* the 95% always-valid interval (for
    reading every day).
    """

    treated_successes: int
    treated_n: int
    control_successes: int
    control_n: int
    treated_rate: float | None
    control_rate: float | None
    uplift: float | None
    ci_low: float | None
    ci_high: float | None
    seq_low: float | None
    seq_high: float | None
    enough_data: bool


def estimate_uplift(
    ts: int, tn: int, cs: int, cn: int, *, min_n: int = MIN_N, planned_n: int = PLANNED_N
) -> UpliftEstimate:
    """Uplift = treated success rate - control success rate, with both 95% intervals."""
    fixed = newcombe_difference(ts, tn, cs, cn, 0.95, min_n=min_n)
    seq = sequential_difference_interval(ts, tn, cs, cn, 0.05, planned_n=planned_n, min_n=min_n)
    uplift, ci_low, ci_high = fixed if fixed is not None else (None, None, None)
    seq_low, seq_high = seq if seq is not None else (None, None)
    return UpliftEstimate(
        treated_successes=ts, treated_n=tn, control_successes=cs, control_n=cn,
        treated_rate=ts / tn if tn else None, control_rate=cs / cn if cn else None,
        uplift=uplift, ci_low=ci_low, ci_high=ci_high, seq_low=seq_low, seq_high=seq_high,
        enough_data=fixed is not None,
    )


@dataclass(frozen=True)
class SrmResult:
    """Sample-ratio-mismatch check. Statistic fields are None when not applicable."""

    control_n: int
    total_n: int
    expected_fraction: float
    observed_fraction: float | None
    chi_square: float | None
    p_value: float | None
    mismatch: bool | None  # None: not applicable (too few units, or holdout 0 or 1)

    @property
    def applicable(self) -> bool:
        return self.p_value is not None


def sample_ratio_mismatch(control_n: int, total_n: int, expected_fraction: float) -> SrmResult:
    """Is the control share consistent with the rule's holdout fraction?

    A control group that is not the configured share of units means assignment or recording
    is broken (e.g. outcomes lost for one group), and then every uplift is biased. Pearson
    chi-squared goodness of fit, 1 degree of freedom: p = erfc(sqrt(x / 2)).

    mismatch when p < 0.001: the threshold used in practice (Fabijan et al. 2019; Kohavi,
    Tang & Xu 2020). It is strict because the check runs continuously on every read, so a
    5% threshold would raise false alarms routinely; a real SRM quickly drives p far below
    0.001. Not applicable (None fields) when total_n < 20, when an expected count is below
    5 (the chi-squared approximation needs it), or when expected_fraction is 0 or 1.
    """
    if not 0 <= control_n <= total_n:
        raise ValueError(f"need 0 <= control_n <= total_n, got {control_n}, {total_n}")
    if not 0.0 <= expected_fraction <= 1.0:
        raise ValueError(f"expected_fraction must be in [0, 1], got {expected_fraction}")
    observed = control_n / total_n if total_n else None
    expected_control = total_n * expected_fraction
    expected_treated = total_n - expected_control
    if total_n < SRM_MIN_TOTAL or min(expected_control, expected_treated) < SRM_MIN_EXPECTED:
        return SrmResult(control_n, total_n, expected_fraction, observed, None, None, None)
    treated_n = total_n - control_n
    chi2 = (control_n - expected_control) ** 2 / expected_control + (
        treated_n - expected_treated
    ) ** 2 / expected_treated
    p = math.erfc(math.sqrt(chi2 / 2))
    return SrmResult(control_n, total_n, expected_fraction, observed, chi2, p, p < SRM_THRESHOLD)


@dataclass(frozen=True)
class ScoreBand:
    """Control records with low <= score < high (the last band includes its high edge)."""

    low: float
    high: float
    n: int
    positives: int
    precision: float | None
    ci: tuple[float, float] | None  # Wilson interval of precision at the given confidence


def score_band_precision(
    records: Iterable[tuple[float, bool]], edges: Sequence[float] = DEFAULT_BAND_EDGES, confidence: float = 0.95
) -> list[ScoreBand]:
    """Model precision per score band, from the control group.

    records are (score, outcome_is_bad) of held-out predictions. Control units got no
    intervention, so the share of bad outcomes among them is what the model's score is
    worth on its own; treated units would mix in the effect of the intervention.
    Bands are [edges[i], edges[i+1]), the last one closed. Scores outside [edges[0],
    edges[-1]] belong to no band and are not counted (pass wider edges to include them).
    precision and ci are None for an empty band.
    """
    if len(edges) < 2 or any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"edges must be at least two strictly increasing values, got {list(edges)}")
    last = len(edges) - 2
    counts = [0] * (last + 1)
    positives = [0] * (last + 1)
    for score, bad in records:
        if math.isnan(score):
            raise ValueError("score is NaN")
        if score < edges[0] or score > edges[-1]:
            continue
        i = min(bisect_right(edges, score) - 1, last)
        counts[i] += 1
        positives[i] += bool(bad)
    return [
        ScoreBand(
            low=edges[i], high=edges[i + 1], n=counts[i], positives=positives[i],
            precision=positives[i] / counts[i] if counts[i] else None,
            ci=wilson_interval(positives[i], counts[i], confidence),
        )
        for i in range(last + 1)
    ]
