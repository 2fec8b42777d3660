"""Statistics for benchmark results: Wilson intervals, percentiles, ratios, latency summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95% quantile of the standard normal distribution.
Z_95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Return the Wilson score interval (low, high) for a binomial proportion.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 or n
    successes, which small per-task question counts hit often. Raises ValueError for
    no trials or for successes outside [0, trials].
    """
    if trials <= 0:
        raise ValueError(f"a confidence interval needs at least one trial, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be between 0 and {trials}, got {successes}")

    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # Clamp rounding noise so that the interval always contains p.
    return max(0.0, min(center - half_width, p)), min(1.0, max(center + half_width, p))


def percentile(values: Sequence[float], q: float) -> float:
    """Return the q-th percentile (0 to 100), interpolating linearly between ranks.

    This is numpy's default ("linear") method. Raises ValueError for an empty sequence.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be between 0 and 100, got {q}")

    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    below = math.floor(rank)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


def ratio(numerator: float, denominator: float) -> float:
    """Return numerator / denominator; raises ValueError unless both are positive and finite."""
    for name, value in (("numerator", numerator), ("denominator", denominator)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"ratio {name} must be positive and finite, got {value}")
    return numerator / denominator


def summarize_ms(values: Sequence[float]) -> dict[str, float]:
    """Return the count, median, p90, mean, min and max of a list of milliseconds."""
    if not values:
        raise ValueError("cannot summarize an empty list of latencies")
    return {
        "n": len(values),
        "median_ms": percentile(values, 50),
        "p90_ms": percentile(values, 90),
        "mean_ms": sum(values) / len(values),
        "min_ms": min(values),
        "max_ms": max(values),
    }


def accuracy_summary(correct: Sequence[bool]) -> dict[str, float]:
    """Return accuracy, its Wilson 95% interval and the count for a list of right/wrong outcomes."""
    successes = sum(bool(c) for c in correct)
    low, high = wilson_interval(successes, len(correct))
    return {"accuracy": successes / len(correct), "ci_low": low, "ci_high": high,
            "n": len(correct), "correct": successes}


def mcnemar_exact(wins: int, losses: int) -> float:
    """Return the two-sided exact McNemar p-value for paired right/wrong outcomes.

    `wins` counts questions the first mode got right and the second wrong, `losses`
    the reverse. Under the null hypothesis of equal accuracy each discordant question
    is a fair coin flip, so this is a two-sided binomial test on wins + losses flips.
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be non-negative, got {wins} and {losses}")
    flips = wins + losses
    if flips == 0:
        return 1.0
    tail = sum(math.comb(flips, k) for k in range(min(wins, losses) + 1)) / 2 ** flips
    return min(1.0, 2 * tail)


def paired_comparison(first: Sequence[bool], second: Sequence[bool]) -> dict[str, float]:
    """Compare two modes on the same questions: wins and losses of `first`, and the McNemar p-value."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need equal lengths, got {len(first)} and {len(second)}")
    wins = sum(1 for a, b in zip(first, second) if a and not b)
    losses = sum(1 for a, b in zip(first, second) if b and not a)
    return {"wins": wins, "losses": losses, "ties": len(first) - wins - losses,
            "p_value": mcnemar_exact(wins, losses)}
