"""The statistics of comparing policies: win rates with confidence intervals, and diversity.

Pure functions of plain numbers and strings, tested against hand-computed values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist


def wilson_interval(successes: float, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sensible near 0 and 1, and for small n).
    `successes` may be fractional: a tie counts as half a win."""
    if trials == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class WinRate:
    """Head-to-head outcome of a candidate against a baseline on the same prompts."""

    wins: int
    ties: int
    losses: int
    # (wins + ties / 2) / n over all pairs: a tie is half a win, as in AlpacaEval and most
    # head-to-head reports, so 3 wins, 1 loss and 96 ties reads 0.51, not 0.75
    rate: float
    low: float
    high: float

    @property
    def decided(self) -> int:
        return self.wins + self.losses


def win_rate(
    candidate: Sequence[float], baseline: Sequence[float], confidence: float = 0.95, tie_tolerance: float = 0.0
) -> WinRate:
    """Compare paired scores; |difference| <= tie_tolerance is a tie, counted as half a win. The
    interval is Wilson's over all n pairs with wins + ties / 2 successes."""
    if len(candidate) != len(baseline):
        raise ValueError(f"{len(candidate)} candidate scores but {len(baseline)} baseline scores")
    wins = ties = losses = 0
    for c, b in zip(candidate, baseline):
        if abs(c - b) <= tie_tolerance:
            ties += 1
        elif c > b:
            wins += 1
        else:
            losses += 1
    n = wins + ties + losses
    successes = wins + ties / 2
    rate = successes / n if n else float("nan")
    low, high = wilson_interval(successes, n, confidence)
    return WinRate(wins, ties, losses, rate, low, high)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (whitespace tokens): 1 is all different."""
    total, seen = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
