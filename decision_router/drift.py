"""Drift maths: has a model input (or a data-quality rate) moved away from its reference?

Pure functions; None (or None fields) where the samples are too small to tell. The
chi-squared quantile is computed here in pure Python so the service needs no scipy.
Definitions and references: docs/statistics.md.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

PSI_MIN_N = 50
"""Fewest values per sample for a PSI: with 10 bins that is ~5 per bin, the usual floor for
chi-squared approximations."""
PSI_MAX_N = 50_000
"""Most values the monitor reads per window (decision_router.monitor.MAX_SAMPLES): a larger
`drift.min_samples` could never be reached."""

RATE_MIN_N = 30


def _quantile_cuts(sorted_ref: Sequence[float], bins: int) -> list[float]:
    """Interior cut points at the reference's k/bins order statistics, ties merged.

    Bins are (cut[i-1], cut[i]], right-closed, so every value tied at a cut lands in one bin.
    Duplicate cuts (a value repeated across a quantile) are merged, and a cut equal to the
    reference maximum is dropped, so every bin holds reference values.

    Unless that leaves a single bin: the reference maximum then holds at least 1 - 1/bins of
    the reference (a constant, or a flag that is nearly always set), and one bin would compare
    nothing. The bins are then below, at and above the maximum, so a value that was (almost)
    always the same and starts to vary moves the index. Under no drift the recent values stay
    in the bins the reference used, and the empty ones add next to nothing (half a count each).
    """
    n = len(sorted_ref)
    top = sorted_ref[-1]
    cuts: list[float] = []
    for k in range(1, bins):
        cut = sorted_ref[math.ceil(k * n / bins) - 1]
        if cut < top and (not cuts or cut > cuts[-1]):
            cuts.append(cut)
    if not cuts:
        below = math.nextafter(top, -math.inf)  # (-inf, below] holds exactly the values < top
        return [below, top] if below < top else [top]
    return cuts


def _shares(values: Sequence[float], cuts: Sequence[float], missing: int | None = None) -> list[float]:
    """Each bin's share of the sample; with `missing`, a last bin holds the units without a value."""
    counts = [0] * (len(cuts) + 1)
    for v in values:
        counts[bisect_left(cuts, v)] += 1
    if missing is not None:
        counts.append(missing)
    return _smoothed(counts)


def _smoothed(counts: Sequence[int]) -> list[float]:
    """Shares of `counts`, each bin with half an observation added."""
    # Half an observation added to every bin (the Jeffreys / Krichevsky-Trofimov estimate):
    # an empty bin means "fewer than one in n", not "never", so it stays finite without an
    # arbitrary epsilon (a fixed 1e-4 lets one empty bin in a small sample dominate the
    # index). It also tames the log's long tail at small counts: with raw shares, PSI
    # exceeded its alpha = 1% threshold in ~2% of no-drift samples of 100; with this, ~1%.
    return [(c + 0.5) / (sum(counts) + len(counts) / 2) for c in counts]


def _check_values(name: str, values: Sequence[float]) -> None:
    if any(math.isnan(v) for v in values):
        raise ValueError(f"{name} contains NaN; filter missing values first")


def _psi_and_bins(
    reference: Sequence[float], recent: Sequence[float], bins: int, min_n: int,
    reference_missing: int = 0, recent_missing: int = 0,
) -> tuple[float, int] | None:
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    _check_values("reference", reference)
    _check_values("recent", recent)
    if reference_missing < 0 or recent_missing < 0:
        raise ValueError("missing counts must be >= 0")
    if len(reference) + reference_missing < min_n or len(recent) + recent_missing < min_n:
        return None
    # Values are binned only when the reference has enough of them for its quantiles to mean
    # something; otherwise they form one bin, and only their presence is compared.
    cuts = _quantile_cuts(sorted(reference), bins) if reference and len(reference) >= min_n else []
    # A value missing in either window is a bin of its own ("missing"), so a feature that
    # goes missing (or stops being a number) moves the index instead of shrinking the sample.
    missing = (reference_missing, recent_missing) if reference_missing or recent_missing else (None, None)
    if not cuts and missing[0] is None:
        return None  # only when the reference has no values at all (min_n = 0)
    e = _shares(reference, cuts, missing[0])
    a = _shares(recent, cuts, missing[1])
    return _index(e, a), len(e)


def _index(e: Sequence[float], a: Sequence[float]) -> float:
    return sum((ai - ei) * math.log(ai / ei) for ai, ei in zip(a, e, strict=True))


def psi(reference: Sequence[float], recent: Sequence[float], bins: int = 10, *, min_n: int = PSI_MIN_N) -> float | None:
    """Population stability index of `recent` against `reference`.

    PSI = sum over bins of (a_i - e_i) * ln(a_i / e_i), with e_i the reference share and a_i
    the recent share of bin i. Bins are the reference's quantiles (equal reference mass), so
    each bin is equally informative. Ties can merge bins: a variable with few distinct values
    gets fewer than `bins`, and a reference that is (nearly) one value gets three: below, at
    and above it. None when either sample has fewer than `min_n` values. Read it against
    `psi_threshold`, not a fixed 0.1 / 0.25.
    """
    result = _psi_and_bins(reference, recent, bins, min_n)
    return None if result is None else result[0]


# --- chi-squared distribution (pure Python) ----------------------------------------------


def _gamma_pq(a: float, x: float) -> tuple[float, float]:
    """Regularized incomplete gamma (P, Q) = (gamma(a, x), Gamma(a, x)) / Gamma(a).

    Series for P when x < a + 1, Lentz's continued fraction for Q beyond: each converges fast
    where it is used (Numerical Recipes, 6.2), and the tail that is not computed by
    subtraction keeps full relative precision (needed for small alpha).
    """
    if x <= 0:
        return 0.0, 1.0
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if term < total * 1e-17:
                break
        p = min(1.0, total * math.exp(log_prefix))
        return p, 1.0 - p
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-16:
            break
    q = min(1.0, math.exp(log_prefix) * h)
    return 1.0 - q, q


def chi2_cdf(x: float, dof: float) -> float:
    """P(X <= x) for X ~ chi-squared(dof)."""
    if dof <= 0:
        raise ValueError(f"dof must be > 0, got {dof}")
    return _gamma_pq(dof / 2, x / 2)[0]


def chi2_sf(x: float, dof: float) -> float:
    """P(X > x) for X ~ chi-squared(dof), accurate far into the tail."""
    if dof <= 0:
        raise ValueError(f"dof must be > 0, got {dof}")
    return _gamma_pq(dof / 2, x / 2)[1]


_LOG_X_LIMIT = 700.0


def _chi2_root(tail: float, dof: float, upper: bool) -> float:
    """x with P(X <= x) = tail (upper=False) or P(X > x) = tail (upper=True).

    Newton steps on log(tail probability) against log(x), which is close to linear in both
    tails, from a Wilson-Hilferty start (or the small-x power law x^k / Gamma(k + 1) when
    Wilson-Hilferty goes negative). A bisection bracket catches any step that overshoots.
    """
    if not 0.0 < tail < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {tail}")
    if dof <= 0:
        raise ValueError(f"dof must be > 0, got {dof}")
    k = dof / 2
    log_target = math.log(tail)

    def g(u: float) -> tuple[float, float]:
        """log tail(e^u) - log target, and its derivative in u."""
        y = math.exp(u) / 2  # gamma-scale argument
        p, q = _gamma_pq(k, y)
        prob = q if upper else p
        if prob <= 0.0:
            return -math.inf, 0.0  # underflow: far past the target in this tail
        log_density = k * math.log(y) - y - math.lgamma(k)  # y * gamma pdf(y)
        slope = math.exp(log_density) / prob
        return math.log(prob) - log_target, -slope if upper else slope

    z = -NormalDist().inv_cdf(tail) if upper else NormalDist().inv_cdf(tail)
    h = 2 / (9 * dof)
    wh = dof * (1 - h + z * math.sqrt(h)) ** 3
    if wh > 0:
        u = math.log(wh)
    else:
        u = math.log(2) + (log_target + math.lgamma(k + 1)) / k
    # Bracket: g is increasing in u for the lower tail, decreasing for the upper tail.
    # Kept within exp's range: a quantile below e^-700 is returned as that.
    sign = -1.0 if upper else 1.0
    u = min(max(u, -_LOG_X_LIMIT), _LOG_X_LIMIT)
    lo = hi = u
    step = 1.0
    while sign * g(lo)[0] > 0 and lo > -_LOG_X_LIMIT:
        lo = max(lo - step, -_LOG_X_LIMIT)
        step *= 2
    step = 1.0
    while sign * g(hi)[0] < 0 and hi < _LOG_X_LIMIT:
        hi = min(hi + step, _LOG_X_LIMIT)
        step *= 2
    for _ in range(200):
        value, slope = g(u)
        if value == 0.0:
            break
        if sign * value < 0:
            lo = u
        else:
            hi = u
        u_new = u - value / slope if slope != 0.0 and math.isfinite(value) else math.nan
        if not lo < u_new < hi:
            u_new = (lo + hi) / 2
        if abs(u_new - u) < 1e-15 or hi - lo < 1e-15:
            u = u_new
            break
        u = u_new
    return math.exp(u)


def chi2_quantile(p: float, dof: float) -> float:
    """x with P(chi-squared(dof) <= x) = p (the lower tail when p <= 1/2, else the upper)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    return _chi2_root(p, dof, upper=False) if p <= 0.5 else _chi2_root(1 - p, dof, upper=True)


# --- PSI with a sample-size aware threshold -----------------------------------------------


def psi_threshold(n_reference: int, n_recent: int, bins: int = 10, alpha: float = 0.01) -> float:
    """PSI above which drift is declared at false-alarm rate `alpha`.

    Under no drift, PSI is approximately (1/N + 1/M) * chi-squared(B - 1) for reference size
    N, recent size M and B bins (Yurdakul 2018). The cut-off is that distribution's 1 - alpha
    quantile. Why not the customary fixed 0.1 / 0.25: a fixed cut-off ignores sample size.
    With no drift at all, PSI averages about 0.09 at 200 values per sample (9 * 2/200), so
    0.1 fires on noise; with 200,000 per sample a 0.2-sd shift of the mean (PSI ~ 0.04) is
    unmistakable yet never reaches 0.1. The approximation is first order; with the
    half-count smoothing in `psi` it measured close to nominal (alpha = 1%: 0.95% at 100
    per sample, 1.1% at 5000) and conservative at 50 (0.3%).
    """
    if n_reference < 1 or n_recent < 1:
        raise ValueError("sample sizes must be >= 1")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return (1 / n_reference + 1 / n_recent) * _chi2_root(alpha, bins - 1, upper=True)


@dataclass(frozen=True)
class DriftResult:
    """psi, threshold and drifted are None when a sample is too small.
    n_reference, n_recent: the units of each window, those with a value and those missing one."""

    psi: float | None
    threshold: float | None
    drifted: bool | None
    n_reference: int
    n_recent: int
    bins: int | None  # bins actually used (ties can merge some; "missing" counts as one)


def drift_check(
    reference: Sequence[float], recent: Sequence[float], bins: int = 10, alpha: float = 0.01, *, min_n: int = PSI_MIN_N,
    reference_missing: int = 0, recent_missing: int = 0,
) -> DriftResult:
    """PSI compared with its sample-size aware threshold (for the bins actually used).

    `reference_missing`, `recent_missing`: units of each window without a value (a feature
    absent, null or not a number); when either is non-zero they form one more bin.
    """
    n_reference, n_recent = len(reference) + reference_missing, len(recent) + recent_missing
    result = _psi_and_bins(reference, recent, bins, min_n, reference_missing, recent_missing)
    if result is None:
        return DriftResult(None, None, None, n_reference, n_recent, None)
    value, used = result
    threshold = psi_threshold(n_reference, n_recent, used, alpha)
    return DriftResult(value, threshold, value > threshold, n_reference, n_recent, used)


def category_drift_check(
    reference: Sequence[str], recent: Sequence[str], bins: int = 10, alpha: float = 0.01, *, min_n: int = PSI_MIN_N,
    reference_missing: int = 0, recent_missing: int = 0,
) -> DriftResult:
    """PSI of a categorical variable (strings), compared with the same threshold as `drift_check`.

    Bins: the reference's `bins - 1` most common categories (ties by name, so every worker
    picks the same), then "other": every other category, including those the reference never
    had, so a new value moves the index. Long-tailed variables (ids, free text) mostly land in
    "other" in both windows and do not fire. Missing values and too small a reference are
    handled as in `drift_check`: one more bin for units without a value, and a reference with
    fewer than `min_n` values is one bin of values (only presence is compared).
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if reference_missing < 0 or recent_missing < 0:
        raise ValueError("missing counts must be >= 0")
    n_reference, n_recent = len(reference) + reference_missing, len(recent) + recent_missing
    none = DriftResult(None, None, None, n_reference, n_recent, None)
    if n_reference < min_n or n_recent < min_n:
        return none
    top: list[str] = []
    if reference and len(reference) >= min_n:
        # Ranked over both windows, not the reference alone: a category picked because its
        # reference count is high by chance would be over-represented in the reference (by
        # selection) and push PSI up under no drift (measured: 2-3% false alarms at alpha 1%).
        ranked = sorted((Counter(reference) + Counter(recent)).items(), key=lambda item: (-item[1], item[0]))
        top = [category for category, _ in ranked[: bins - 1]]
    position = {category: i for i, category in enumerate(top)}

    def counts(values: Sequence[str], missing: int) -> list[int]:
        binned = [0] * (len(top) + 1)  # the last one is "other"
        for value in values:
            binned[position.get(value, len(top))] += 1
        return binned + [missing] if reference_missing or recent_missing else binned

    e, a = counts(reference, reference_missing), counts(recent, recent_missing)
    if len(e) < 2:
        return none  # no reference values and nothing missing (min_n = 0): nothing to compare
    value, used = _index(_smoothed(e), _smoothed(a)), len(e)
    threshold = psi_threshold(n_reference, n_recent, used, alpha)
    return DriftResult(value, threshold, value > threshold, n_reference, n_recent, used)


# --- rate jump (rejections, missing context) ---------------------------------------------


def rate_jump_p_value(
    reference_events: int, reference_n: int, recent_events: int, recent_n: int, *, min_n: int = RATE_MIN_N
) -> float | None:
    """One-sided p-value that the recent rate is higher; None if a period has < min_n units.

    Fisher's exact test: given the total number of events, the chance that at least
    `recent_events` of them fall in the recent period when both periods share one rate
    (a hypergeometric tail). Exact rather than a two-proportion z-test because rejection and
    missing-context rates are usually rare: against a reference of 0 events in 1000, the
    z-test calls a single event in 50 recent ones a jump (p = 4e-6), while such a split
    happens 5% of the time (Fisher's p = 50/1050).
    """
    for events, n in ((reference_events, reference_n), (recent_events, recent_n)):
        if n < 0 or events < 0 or events > n:
            raise ValueError(f"need 0 <= events <= n, got events={events}, n={n}")
    if reference_n < min_n or recent_n < min_n:
        return None
    return _hypergeometric_sf(recent_events, reference_n + recent_n, reference_events + recent_events, recent_n)


def rate_jump(
    reference_events: int, reference_n: int, recent_events: int, recent_n: int, alpha: float = 0.01,
    *, min_n: int = RATE_MIN_N,
) -> bool | None:
    """Has the event rate (rejections, missing context) jumped? None if a period has < min_n.

    True when `rate_jump_p_value` < alpha. alpha = 1% because the check repeats for every
    model and period: at 5% a healthy pipeline would raise an alarm every few reads.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    p = rate_jump_p_value(reference_events, reference_n, recent_events, recent_n, min_n=min_n)
    return None if p is None else p < alpha


def _hypergeometric_sf(x: int, population: int, successes: int, draws: int) -> float:
    """P(X >= x), X ~ Hypergeometric(population, successes, draws).

    Sums the shorter side: the upper tail from x when x is above the mean, otherwise one
    minus the lower tail below x. Either way terms shrink geometrically away from the mean,
    so the sum stops as soon as they no longer change it.
    """
    low, high = max(0, draws + successes - population), min(successes, draws)
    if x <= low:
        return 1.0
    if x > high:
        return 0.0

    def pmf(k: int) -> float:
        return math.exp(_log_choose(successes, k) + _log_choose(population - successes, draws - k)
                        - _log_choose(population, draws))

    def ratio_up(k: int) -> float:  # pmf(k + 1) / pmf(k)
        return (successes - k) * (draws - k) / ((k + 1) * (population - successes - draws + k + 1))

    upper = x * population > draws * successes
    k = x if upper else x - 1
    term = total = pmf(k)
    while term > total * 1e-17 and (k < high if upper else k > low):
        if upper:
            term *= ratio_up(k)
            k += 1
        else:
            term /= ratio_up(k - 1)
            k -= 1
        total += term
    return min(1.0, total) if upper else max(0.0, 1.0 - total)


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
