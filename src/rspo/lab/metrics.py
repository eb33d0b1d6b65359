"""The one reader of a run's ``metrics.jsonl`` for the research tooling, and the names it reads.

The trainer logs every metric per step, and the drift signals also averaged over the off-policy updates
alone (:func:`rspo.trainer.offpolicy_key`); the names below are built from that one definition.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from rspo.routing import GAMMA_EDGES, histogram_quantile, histogram_share_below
from rspo.rundir import read_metrics
from rspo.trainer import OFFPOLICY_HIST, offpolicy_key

GAMMA_OFF = offpolicy_key("router/gamma_mean")
BELOW_95_OFF = offpolicy_key("router/gamma_below_0.95")
KEEP_ALL_OFF = offpolicy_key("router/non_shifted_ratio")
RATIO_STD_OFF = offpolicy_key("ratio/std")
RATIO_MAX_OFF = offpolicy_key("ratio/max")
KEEP_LAYER_OFF = offpolicy_key("router/keep_layer")  # + the layer index
HIST_OFF = OFFPOLICY_HIST


def run_metrics(run: str | Path, missing_ok: bool = False) -> list[dict[str, Any]]:
    """Every logged row of run directory ``run`` (``missing_ok``: [] for a run not started)."""
    return read_metrics(run, missing_ok=missing_ok)


def series(rows: list[dict], key: str, smooth: int = 1) -> dict[int, float]:
    """step -> value of ``key`` (finite values only), as a trailing mean over ``smooth`` logged points."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    out = {}
    for i, (s, _) in enumerate(pts):
        window = [v for _, v in pts[max(0, i - smooth + 1) : i + 1]]
        out[s] = sum(window) / len(window)
    return out


def mean_of(rows: list[dict], key: str) -> float:
    """Mean of ``key`` over the rows that log it as a number (NaN when none does)."""
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.mean(vals) if vals else float("nan")


def last_with(rows: list[dict], key: str) -> dict | None:
    """The last row that logs ``key``."""
    return next((r for r in reversed(rows) if key in r), None)


def drift_summary(rows: list[dict]) -> dict[str, Any]:
    """A run's drift over its off-policy updates: the pooled per-token gamma histogram, its tail (exact shares
    below 0.99 / 0.95 / 0.9, quantiles interpolated within bins), the share keeping all their experts, per
    layer keep and shift, and the importance-ratio std."""
    hist = [0] * len(GAMMA_EDGES)
    for r in rows:
        for i, c in enumerate(r.get(HIST_OFF, [])):
            hist[i] += c
    layers = sorted(
        {k for r in rows for k in r if k.startswith(KEEP_LAYER_OFF)}, key=lambda k: int(k.rsplit("layer", 1)[1])
    )
    return {
        "tokens": sum(hist),
        "hist": hist,
        "gamma_mean": mean_of(rows, GAMMA_OFF),
        "p1": histogram_quantile(hist, 0.01),
        "p10": histogram_quantile(hist, 0.10),
        "p50": histogram_quantile(hist, 0.50),
        "below_0.99": histogram_share_below(hist, 0.99),
        "below_0.95": histogram_share_below(hist, 0.95),
        "below_0.9": histogram_share_below(hist, 0.9),
        "keep_all": mean_of(rows, KEEP_ALL_OFF),
        "keep_layer": [mean_of(rows, k) for k in layers],
        "shift_layer": [mean_of(rows, k.replace("keep", "shift")) for k in layers],
        "ratio_std": mean_of(rows, RATIO_STD_OFF),
        "steps": rows[-1]["step"] if rows else 0,
    }
