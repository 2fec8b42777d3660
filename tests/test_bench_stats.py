import math

import numpy as np
import pytest

from cachetalk.benchmarks.stats import (accuracy_summary, mcnemar_exact, paired_comparison, percentile, ratio,
                                         summarize_ms, wilson_interval)

# Wilson score intervals without continuity correction for the worked examples of
# Newcombe (1998), "Two-sided confidence intervals for the single proportion",
# Statistics in Medicine 17:857-872, and for the symmetric case of 5 in 10.
NEWCOMBE_CASES = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (5, 10, 0.2366, 0.7634),
]


@pytest.mark.parametrize("successes, trials, low, high", NEWCOMBE_CASES)
def test_wilson_matches_published_values(successes, trials, low, high):
    got_low, got_high = wilson_interval(successes, trials)
    assert got_low == pytest.approx(low, abs=5e-5)
    assert got_high == pytest.approx(high, abs=5e-5)


def test_wilson_all_successes_reaches_one():
    low, high = wilson_interval(20, 20)
    assert high == 1.0
    assert low == pytest.approx(1 - 0.1611, abs=5e-5)


@pytest.mark.parametrize("trials", [1, 2, 7, 50, 1000])
def test_wilson_contains_point_estimate(trials):
    for successes in range(0, trials + 1, max(1, trials // 10)):
        low, high = wilson_interval(successes, trials)
        assert 0.0 <= low <= successes / trials <= high <= 1.0


def test_wilson_narrows_with_more_trials():
    small = wilson_interval(5, 10)
    large = wilson_interval(500, 1000)
    assert large[1] - large[0] < small[1] - small[0]


@pytest.mark.parametrize("successes, trials", [(0, 0), (3, 2), (-1, 5)])
def test_wilson_rejects_invalid_counts(successes, trials):
    with pytest.raises(ValueError):
        wilson_interval(successes, trials)


@pytest.mark.parametrize("q", [0, 10, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = [5.0, 1.0, 9.5, 3.25, 7.0, 2.0, 8.0]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_known_values():
    assert percentile([1, 2, 3, 4, 10], 50) == 3
    assert percentile([1, 2, 3, 4, 10], 90) == pytest.approx(7.6)
    assert percentile([4.0], 90) == 4.0


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_ratio_divides_positive_values():
    assert ratio(400.0, 100.0) == 4.0
    assert ratio(1.0, 4.0) == 0.25


@pytest.mark.parametrize("numerator, denominator", [(1.0, 0.0), (0.0, 1.0), (-1.0, 2.0), (math.inf, 1.0), (1.0, math.nan)])
def test_ratio_rejects_nonpositive_or_infinite(numerator, denominator):
    with pytest.raises(ValueError):
        ratio(numerator, denominator)


def test_summarize_ms_fields():
    summary = summarize_ms([10.0, 30.0, 20.0, 40.0])
    assert summary["n"] == 4
    assert summary["median_ms"] == 25.0
    assert summary["p90_ms"] == pytest.approx(37.0)
    assert summary["mean_ms"] == 25.0
    assert (summary["min_ms"], summary["max_ms"]) == (10.0, 40.0)


def test_accuracy_summary_counts_and_interval():
    summary = accuracy_summary([True, False, True, True])
    assert summary["n"] == 4
    assert summary["correct"] == 3
    assert summary["accuracy"] == 0.75
    assert summary["ci_low"] < 0.75 < summary["ci_high"]


@pytest.mark.parametrize("wins, losses, expected", [
    (0, 5, 2 / 32),  # 2 * P(X <= 0) for 5 fair flips
    (1, 9, 2 * 11 / 1024),  # 2 * P(X <= 1) for 10 fair flips
    (9, 1, 2 * 11 / 1024),
    (3, 3, 1.0),
    (0, 0, 1.0),
])
def test_mcnemar_exact_known_values(wins, losses, expected):
    assert mcnemar_exact(wins, losses) == pytest.approx(expected)


def test_paired_comparison_counts():
    first = [True, True, False, False, True]
    second = [True, False, True, False, False]
    result = paired_comparison(first, second)
    assert result["wins"] == 2
    assert result["losses"] == 1
    assert result["ties"] == 2
    assert result["p_value"] == pytest.approx(1.0)


def test_paired_comparison_rejects_unequal_lengths():
    with pytest.raises(ValueError):
        paired_comparison([True], [True, False])
