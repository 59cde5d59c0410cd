"""Statistics against published values (Student's t tables, Wikipedia's Welch example)."""

from __future__ import annotations

import math

import pytest

from tmem_host.testbed import stats


@pytest.mark.parametrize(
    ("t", "dof", "p"),
    [(12.706, 1, 0.05), (4.303, 2, 0.05), (2.776, 4, 0.05), (2.228, 10, 0.05), (3.169, 10, 0.01), (1.96, 1e6, 0.05)],
)
def test_student_t_matches_tables(t: float, dof: float, p: float) -> None:
    assert stats.student_t_two_sided_p(t, dof) == pytest.approx(p, abs=2e-4)


def test_welch_matches_published_example() -> None:
    # Wikipedia, "Welch's t-test", example 1.
    a = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    b = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    result = stats.welch_t_test(a, b)
    assert result is not None
    assert result.t == pytest.approx(-2.46, abs=0.01)
    assert result.dof == pytest.approx(25.0, abs=0.1)
    assert result.p_value == pytest.approx(0.021, abs=0.001)
    assert result.significant and stats.significance_mark(result) == "*"


def test_welch_needs_two_samples_and_handles_constants() -> None:
    assert stats.welch_t_test([1.0], [2.0, 3.0]) is None
    same = stats.welch_t_test([5.0, 5.0], [5.0, 5.0])
    assert same is not None and same.p_value == 1.0 and not same.significant
    apart = stats.welch_t_test([5.0, 5.0], [7.0, 7.0])
    assert apart is not None and apart.p_value == 0.0 and stats.significance_mark(apart) == "**"


def test_overlapping_noise_is_not_significant() -> None:
    result = stats.welch_t_test([20.1, 24.9, 22.0], [21.0, 23.5, 25.1])
    assert result is not None and not result.significant and stats.significance_mark(result) == ""


def test_summary_and_percent_change() -> None:
    summary = stats.summarize([10.0, 12.0, 14.0])
    assert (summary.count, summary.mean, summary.stdev) == (3, 12.0, 2.0)
    assert stats.summarize([3.0]).stdev == 0.0
    assert stats.percent_change(75.0, 100.0) == -25.0
    assert math.isinf(stats.percent_change(1.0, 0.0))
    with pytest.raises(ValueError):
        stats.summarize([])
