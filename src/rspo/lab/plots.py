"""PNG curves of one or several runs (``rspo plot RUN_DIR [RUN_DIR ...]``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rspo.lab.metrics import GAMMA_OFF, KEEP_ALL_OFF, run_metrics, series

PANELS = [
    ("reward/mean", "reward (mean)"),
    ("val/accuracy", "validation accuracy (greedy)"),
    ("clip_ratio/region_mean", "clip fraction (active clip)"),
    ("ratio/std", "importance ratio std"),
    (GAMMA_OFF, "router-shift gamma (mean, off-policy updates)"),
    (KEEP_ALL_OFF, "tokens keeping all experts (off-policy)"),
    ("entropy/mean", "token entropy"),
    ("grad/norm", "gradient norm"),
]


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """One figure with a panel per metric, one line per run; written as PNG to ``out``."""
    runs = [run_metrics(d) for d in run_dirs]
    labels = list(labels) if labels else [Path(d).name for d in run_dirs]
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        for rows, label in zip(runs, labels, strict=True):
            points = series(rows, key)
            x, y = list(points), list(points.values())
            if x:
                ax.plot(x, y, label=label, marker="o" if key.startswith("val/") else None, ms=3, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
