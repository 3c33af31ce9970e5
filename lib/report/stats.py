"""Statistics of the reports: paired differences with t confidence intervals, and matched-point interpolation.

Paired differences. Cells of two steps that share a seed share their
initialisation and batch order, so steps are compared on paired differences: for
each seed s both steps finished, d_s = loss(step, s) - loss(baseline, s); the report
gives mean(d) with a 95% confidence interval mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n).
With one common seed there is no interval.

Matched points. Steps differ in speed, so final losses at equal wall-clock budgets
mix "learns better per token" with "sees more tokens". The report also compares every
step at the same training time and at the same token count: the largest value every
finished cell reached, with each cell's validation loss linearly interpolated between
its evaluations.

The t distribution is computed here (regularized incomplete beta function) rather
than imported from scipy, which the project does not otherwise need.
"""

import dataclasses
import math

import numpy as np
import pandas as pd


def _betacf(a, b, x):
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _incomplete_beta(a, b, x):
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t, df) -> float:
    """Student t distribution function: 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p, df) -> float:
    """Inverse of t_cdf by bisection (t(0.975, 2) = 4.303, t(0.975, 30) = 2.042)."""
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


@dataclasses.dataclass
class PairedDiff:
    n: int  # seeds finished by both
    mean: float
    half_width: float | None  # 95% CI half-width; None when n < 2

    @property
    def significant(self) -> bool:
        return self.half_width is not None and abs(self.mean) > self.half_width

    def to_dict(self) -> dict:
        ci = None if self.half_width is None else [self.mean - self.half_width, self.mean + self.half_width]
        return {"n": self.n, "mean": self.mean, "ci95_half_width": self.half_width, "ci95": ci}


def paired_difference(values: dict, baseline: dict):
    """values, baseline: {seed: loss}. None when no seed has a finite value in both."""
    diffs = [values[s] - baseline[s] for s in values
             if s in baseline and np.isfinite(values[s]) and np.isfinite(baseline[s])]
    if not diffs:
        return None
    n, mean = len(diffs), float(np.mean(diffs))
    if n < 2:
        return PairedDiff(n, mean, None)
    return PairedDiff(n, mean, t_quantile(0.975, n - 1) * float(np.std(diffs, ddof=1)) / math.sqrt(n))


def mean_interval(values) -> tuple:
    """(n, mean, 95% CI half-width t(0.975, n-1)·sd/√n of the mean, or None with one value) of the finite values;
    (0, NaN, None) without any."""
    values = [float(v) for v in values if np.isfinite(v)]
    if not values:
        return 0, float("nan"), None
    n, mean = len(values), float(np.mean(values))
    return n, mean, (t_quantile(0.975, n - 1) * float(np.std(values, ddof=1)) / math.sqrt(n) if n > 1 else None)


def value_at(evals: pd.DataFrame, x_column: str, x: float, y_column="val_loss") -> float:
    """y interpolated linearly at x between evaluations; NaN outside the evaluated range."""
    points = evals[[x_column, y_column]].dropna().sort_values(x_column)
    if points.empty or x < points[x_column].iloc[0] or x > points[x_column].iloc[-1]:
        return float("nan")
    return float(np.interp(x, points[x_column].to_numpy(), points[y_column].to_numpy()))


def matched_point(records, x_column):
    """The largest x every finished run's evaluations reach (None without finished runs)."""
    reach = [r.evals[x_column].max() for r in records if r.done and not r.evals.empty]
    reach = [x for x in reach if np.isfinite(x)]
    return float(min(reach)) if reach else None
