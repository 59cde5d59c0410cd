"""Statistics for repeated runs: mean, standard deviation, change against a
baseline, and Welch's t-test (unequal variances), stdlib only.

With three repetitions per mode on a noisy shared machine, a difference is only
called significant when Welch's test gives p < 0.05; the report prints the mark
next to the % change so that nobody reads noise as a result.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

SIGNIFICANCE_LEVEL = 0.05


@dataclass(frozen=True, slots=True)
class Summary:
    count: int
    mean: float
    stdev: float  # sample standard deviation; 0.0 for a single sample
    minimum: float
    maximum: float


def summarize(samples: Sequence[float]) -> Summary:
    if not samples:
        raise ValueError("no samples")
    stdev = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return Summary(len(samples), statistics.fmean(samples), stdev, min(samples), max(samples))


def percent_change(value: float, baseline: float) -> float:
    """Change of value against baseline in percent (negative = smaller)."""
    if baseline == 0:
        return math.inf if value > 0 else 0.0
    return (value - baseline) / baseline * 100.0


@dataclass(frozen=True, slots=True)
class WelchResult:
    t: float
    dof: float
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE_LEVEL


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> WelchResult | None:
    """Two-sided Welch's t-test; None when it cannot be computed (n < 2)."""
    if len(a) < 2 or len(b) < 2:
        return None
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    var_a, var_b = statistics.variance(a), statistics.variance(b)
    se_a, se_b = var_a / len(a), var_b / len(b)
    if se_a + se_b == 0:
        # Identical constant samples: no evidence of a difference, or certainty.
        return WelchResult(0.0 if mean_a == mean_b else math.inf, float(len(a) + len(b) - 2),
                           1.0 if mean_a == mean_b else 0.0)
    t = (mean_a - mean_b) / math.sqrt(se_a + se_b)
    dof = (se_a + se_b) ** 2 / (se_a**2 / (len(a) - 1) + se_b**2 / (len(b) - 1))
    return WelchResult(t, dof, student_t_two_sided_p(t, dof))


def student_t_two_sided_p(t: float, dof: float) -> float:
    """P(|T| >= |t|) for Student's t with dof degrees of freedom."""
    x = dof / (dof + t * t)
    return regularized_incomplete_beta(dof / 2.0, 0.5, x)


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) by Lentz's continued fraction (Numerical Recipes' betacf)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def significance_mark(result: WelchResult | None) -> str:
    """'*' for p < 0.05, '**' for p < 0.01, '' otherwise or when not testable."""
    if result is None:
        return ""
    if result.p_value < 0.01:
        return "**"
    return "*" if result.significant else ""
