"""Statistics for accuracy claims over fine-tuning seeds: mean +- std and paired differences with a t-interval.

"Better" is said only where the 95% confidence interval of the paired difference excludes 0, and only from at
least :data:`MIN_SEEDS` seeds (with two, a zero spread gives a zero-width interval: no claim). Pure functions on
lists of floats; no SciPy needed (the Student-t quantile is computed here, checked against tables in the tests).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MIN_SEEDS = 3  # the project's evidence standard: accuracy claims from >= 3 seeds


def t_cdf(t: float, df: int) -> float:
    """CDF of Student's t with ``df`` degrees of freedom (Simpson integration of the density from 0)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda x: math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))  # noqa: E731
    a = abs(t)
    steps = 2000  # even; the density is smooth, so this is exact to ~1e-10 on the range used
    h = a / steps
    area = density(0.0) + density(a) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    half = area * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t (``p`` in (0.5, 1)), by bisection on :func:`t_cdf`."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


@dataclass
class PairedDifference:
    """``a - b`` over paired seeds: mean, the ``confidence`` t-interval, and what may be said about it."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def verdict(self) -> str:
        if self.n < MIN_SEEDS:
            return f"{self.n} seed{'s' if self.n > 1 else ''}: no claim (needs {MIN_SEEDS})"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "within noise"

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> PairedDifference:
    """Paired difference of ``a`` and ``b`` (same seeds, same order). A single ``b`` (a deterministic method, e.g.
    training-free ToMe on the one dense model) is paired with every ``a``."""
    if len(b) == 1 and len(a) > 1:
        b = b * len(a)
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need equal, non-zero lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean, sd = mean_std(d)
    n = len(d)
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return PairedDifference(mean, mean - half, mean + half, n, confidence)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """Median of ``values`` and a distribution-free ``confidence`` interval for it: the order statistics
    ``(x_(k), x_(n+1-k))`` with the largest ``k`` such that ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2``.

    Why this one for timings: rounds on a shared machine are not normal (a round hit by another process is an
    outlier, not a wider bell), and the median and its order-statistic interval ignore such rounds. Fewer than 6
    values give no 95% interval (``None``, ``None``)."""
    if not values:
        raise ValueError("no values")
    xs, n = sorted(values), len(values)
    median = (xs[(n - 1) // 2] + xs[n // 2]) / 2
    alpha, k, below = (1.0 - confidence) / 2, 0, 0.0  # below: P(Binomial(n, 1/2) <= k - 1)
    while True:
        nxt = below + math.comb(n, k) / 2.0 ** n  # P(X <= k)
        if nxt > alpha:
            break
        below, k = nxt, k + 1
    if k == 0:
        return median, None, None
    return median, xs[k - 1], xs[n - k]
