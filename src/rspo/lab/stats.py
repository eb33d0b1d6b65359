"""Statistics of the study reports: Student-t intervals over seeds and differences paired by seed.

Seeds are independent draws of a whole run (its data order, sampling and mini-batches); runs of two arms
with the same seed start from the same first rollout batch, which is what pairing uses.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any


def finite(xs: Iterable[float | None]) -> list[float]:
    """The values that are numbers and finite (a run without a value contributes nothing)."""
    return [x for x in xs if x is not None and math.isfinite(x)]


def mean_std(xs: Iterable[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (std 0 for one value, NaN for none)."""
    xs = finite(xs)
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p >= 0.5) of Student's t with ``df`` degrees of freedom: bisection on the CDF,
    whose density is integrated by Simpson's rule (error far below the 1e-4 that a CI needs)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(xs: Iterable[float | None], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its two-sided ``level`` confidence interval, Student's t with n - 1
    degrees of freedom (seeds as independent draws); NaN half-width with fewer than 2 values."""
    xs = finite(xs)
    if len(xs) < 2:
        return (xs[0] if xs else float("nan")), float("nan")
    return statistics.mean(xs), t_quantile((1 + level) / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def paired_differences(per_seed: Mapping[str, Mapping[int, float | None]], compare: list[str]) -> list[dict[str, Any]]:
    """Per pair ``"arm - baseline"``: the mean over common seeds of arm - baseline (``per_seed[arm][seed]``),
    with its 95% t interval. ``compare`` empty: every pair of arms, in order. A pair naming an arm without
    runs is an error."""
    arms = list(per_seed)
    if compare:
        pairs = [tuple(p.split(" - ")) for p in compare]
    else:
        pairs = [(a, b) for i, b in enumerate(arms) for a in arms[i + 1 :]]
    out = []
    for a, b in pairs:
        missing = [x for x in (a, b) if x not in per_seed]
        if missing:
            raise ValueError(f"study.compare: {a} - {b}: no runs for {missing} (arms: {arms})")
        la, lb = per_seed[a], per_seed[b]
        common = sorted(set(la) & set(lb))
        d = [la[s] - lb[s] for s in common if la[s] is not None and lb[s] is not None]
        m, h = mean_ci(d)
        out.append({"arm": a, "baseline": b, "seeds": len(d), "diff": m, "half": h})
    return out
