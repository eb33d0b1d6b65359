"""``rspo report``: a study's report.md and figures, in three steps that can be used on their own.

    arms = collect(cfg)                      # every run's metrics, read once, and the per-arm summary
    figures(arms, out_dir)                   # curves.png, gamma.png, final.png
    text = markdown(arms, cfg, ...)          # report.md
    data = results(arms, cfg)                # results.json: every seed's checks and per-step traces

:func:`write_report` does all three for a study directory.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rspo.config import load_config
from rspo.lab.metrics import BELOW_95_OFF, GAMMA_OFF, KEEP_ALL_OFF, RATIO_MAX_OFF, RATIO_STD_OFF, run_metrics, series
from rspo.lab.stats import mean_ci, mean_std, paired_differences
from rspo.lab.study import StudyConfig, run_dirs
from rspo.rundir import RunDir
from rspo.trainer import is_collapsed

CURVES = [
    ("reward/mean", "reward (mean, smoothed over 10 steps)", 10),
    ("val/accuracy", "validation accuracy (greedy)", 1),
    ("val/accuracy_sampled", "validation accuracy (sampled at the rollout temperature)", 1),
    ("clip_ratio/region_mean", "clip fraction (active clip)", 10),
    (RATIO_STD_OFF, "importance-ratio std (off-policy updates)", 10),
    (RATIO_MAX_OFF, "importance-ratio max (off-policy updates)", 10),
    (GAMMA_OFF, "gamma mean (off-policy updates)", 10),
    ("router/gamma_p10", "gamma p10", 10),
    (KEEP_ALL_OFF, "non-shifted routing ratio (off-policy)", 10),
    ("entropy/mean", "token entropy", 10),
    ("grad/norm", "gradient norm", 10),
    ("grad/minibatch_var", "gradient variance across mini-batches", 10),
]
LATE_CHECKS = 3
"""The report's less noisy accuracy: the mean of each run's last LATE_CHECKS validation checks."""
REPORT_FILES = ("report.md", "results.json", "curves.png", "gamma.png", "final.png")
TRACE_KEYS = (
    "reward/mean",
    "clip_ratio/region_mean",
    RATIO_MAX_OFF,
    RATIO_STD_OFF,
    "grad/norm",
    GAMMA_OFF,
    BELOW_95_OFF,
    "router/gamma_p10",
    KEEP_ALL_OFF,
    "entropy/mean",
)
"""Per-step traces published per seed in results.json (the figures' curves, unsmoothed)."""


# ----------------------------------------------------------------------------------------
# Collect
# ----------------------------------------------------------------------------------------
@dataclass
class ArmRuns:
    """One arm of a report: its overrides and every seed's metrics rows ([] for a run not started)."""

    overrides: list[str]
    runs: dict[int, list[dict]]


def _arm_runs(study: StudyConfig, names: list[str]) -> dict[str, ArmRuns]:
    """``names`` (arms of ``study``, in that order) with every seed's metrics, read once."""
    arms = {arm: ArmRuns(study.arms[arm], {}) for arm in names}
    for arm, seed, run in run_dirs(study):
        if arm in arms:
            arms[arm].runs[seed] = run_metrics(run, missing_ok=True)
    return arms


def load_runs(cfg: StudyConfig) -> dict[str, ArmRuns]:
    """Every run's metrics, read once: this study's arms, then the reference arms as ``<arm> (ref)``."""
    arms = _arm_runs(cfg, list(cfg.arms))
    if cfg.reference_dir:
        ref_dir = Path(cfg.reference_dir)
        if not (ref_dir / "study.yaml").is_file():
            raise FileNotFoundError(f"study.reference_dir: {ref_dir} has no study.yaml: not a study directory")
        ref = load_config(StudyConfig, ref_dir / "study.yaml")
        if (ref.base_config, ref.common) != (cfg.base_config, cfg.common):
            raise ValueError(
                f"study.reference_dir: {ref_dir} ran base_config={ref.base_config} common={ref.common}, this study "
                f"base_config={cfg.base_config} common={cfg.common}: its arms are not comparable"
            )
        missing = [a for a in cfg.reference_arms if a not in ref.arms]
        if missing:
            raise ValueError(f"study.reference_arms: {missing} not in {ref_dir} (arms: {list(ref.arms)})")
        ref.out_dir = str(ref_dir)
        arms |= {f"{arm} (ref)": runs for arm, runs in _arm_runs(ref, cfg.reference_arms).items()}
    return arms


def _seed_summary(cfg: StudyConfig, seed: int, rows: list[dict]) -> dict[str, Any] | None:
    """One run's numbers for the report; None for a run without a validation check."""
    val = [(r["step"], r["val/accuracy"]) for r in rows if "val/accuracy" in r]
    if not val:
        return None
    best = max(v for _, v in val)
    final = val[-1][1]
    sampled = [r["val/accuracy_sampled"] for r in rows if "val/accuracy_sampled" in r]
    upd = [r for r in rows if "clip_ratio/region_mean" in r]

    def avg(key: str) -> float:
        vals = [r[key] for r in upd if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    return {
        "seed": seed,
        "below95": avg(BELOW_95_OFF),
        "entropy": avg("entropy/mean"),
        "final": final,
        "best": best,
        "collapsed": is_collapsed(final, best, cfg.collapse_drop),
        "late": statistics.mean(v for _, v in val[-LATE_CHECKS:]) if len(val) > LATE_CHECKS else None,
        "sampled": sampled[-1] if sampled else None,
        "reach": {lvl: next((s for s, v in val if v >= lvl), None) for lvl in cfg.accuracy_levels},
        "clip": avg("clip_ratio/region_mean"),
        "ratio_std": avg(RATIO_STD_OFF),
        "gamma": avg(GAMMA_OFF),
        "nsr": avg(KEEP_ALL_OFF),
        "gvar": avg("grad/minibatch_var"),
        "steps": rows[-1]["step"] if rows else 0,
    }


def summarize(cfg: StudyConfig, arms: dict[str, ArmRuns] | None = None) -> dict[str, dict[str, Any]]:
    """Per arm: final/best validation accuracy over seeds, collapses, steps to reach, clip fraction, ratio std."""
    arms = load_runs(cfg) if arms is None else arms
    table: dict[str, dict[str, Any]] = {}
    for arm, a in arms.items():
        per_seed = [p for seed, rows in a.runs.items() if (p := _seed_summary(cfg, seed, rows)) is not None]
        if not per_seed:
            continue

        def over_seeds(key: str, per_seed=per_seed) -> tuple[float, float]:
            return mean_std([p[key] for p in per_seed])

        table[arm] = {
            "seeds": len(per_seed),
            "final_per_seed": [p["final"] for p in per_seed],
            "best_per_seed": [p["best"] for p in per_seed],
            "late_ci": mean_ci([p["late"] for p in per_seed]),
            "late_per_seed": {p["seed"]: p["late"] for p in per_seed},
            "collapsed": sum(p["collapsed"] for p in per_seed),
            "reach": {lvl: [p["reach"][lvl] for p in per_seed] for lvl in cfg.accuracy_levels},
            "steps": min(p["steps"] for p in per_seed),
            **{
                k: over_seeds(k)
                for k in (
                    "final",
                    "best",
                    "late",
                    "below95",
                    "entropy",
                    "sampled",
                    "clip",
                    "ratio_std",
                    "gamma",
                    "nsr",
                    "gvar",
                )
            },
        }
    return table


# ----------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------
def figures(table: dict[str, dict[str, Any]], arms: dict[str, ArmRuns], out_dir: Path) -> None:
    """curves.png (mean over seeds, each seed as a thin line, a min..max band), gamma.png (per-step gamma
    distributions) and final.png (final and best accuracy, one dot per seed) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab20" if len(table) > 10 else "tab10").colors
    color = {arm: colors[i % len(colors)] for i, arm in enumerate(table)}
    n = len(CURVES)
    cols = 4
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(20, 4.2 * math.ceil(n / cols)))
    for ax, (key, title, smooth) in zip(axes.flat, CURVES, strict=False):
        for arm in table:
            seeds = [s for rows in arms[arm].runs.values() if (s := series(rows, key, smooth))]
            if not seeds:
                continue
            steps = sorted(set.intersection(*(set(s) for s in seeds)))
            mean = [statistics.mean(s[t] for s in seeds) for t in steps]
            lo = [min(s[t] for s in seeds) for t in steps]
            hi = [max(s[t] for s in seeds) for t in steps]
            ax.plot(steps, mean, label=arm, lw=1.3, color=color[arm], ls="--" if arm.endswith("(ref)") else "-")
            ax.fill_between(steps, lo, hi, color=color[arm], alpha=0.12)
            for s in seeds:  # each seed: instability events stay visible instead of being averaged away
                own = sorted(s)
                ax.plot(own, [s[t] for t in own], lw=0.5, alpha=0.35, color=color[arm])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("thick: mean over seeds; thin: each seed; band = min..max over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)
    plt.close(fig)
    # gamma distribution: per-step p10 and mean of the off-policy updates, pooled over seeds
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for arm in table:
        for j, key in enumerate((GAMMA_OFF, "router/gamma_p10")):
            vals = [r[key] for rows in arms[arm].runs.values() for r in rows if key in r]
            if vals:
                ax[j].hist(vals, bins=40, alpha=0.5, label=arm, color=color[arm])
                ax[j].set_title(f"distribution over steps of {key}", fontsize=10)
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "gamma.png", dpi=100)
    plt.close(fig)
    # final and best validation accuracy: one dot per seed, a bar at the mean
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(table) + 2), 4.5))
    for i, (arm, t) in enumerate(table.items()):
        for dx, key, marker in ((-0.15, "final_per_seed", "o"), (0.15, "best_per_seed", "^")):
            vals = t[key]
            ax.scatter([i + dx] * len(vals), vals, color=color[arm], marker=marker, s=22, zorder=3)
            ax.hlines(statistics.mean(vals), i + dx - 0.12, i + dx + 0.12, color="k", lw=1.5)
    ax.scatter([], [], color="grey", marker="o", label="final (per seed; bar = mean)")
    ax.scatter([], [], color="grey", marker="^", label="best (per seed; bar = mean)")
    ax.set_xticks(range(len(table)), list(table), rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("greedy validation accuracy")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "final.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------
def _ms(x: tuple[float, float], pct: bool = True) -> str:
    m, s = x
    if math.isnan(m):
        return "n/a"
    return f"{m:.1%} +- {s:.1%}" if pct else f"{m:.4g} +- {s:.2g}"


def _ci(x: tuple[float, float]) -> str:
    m, h = x
    return "n/a" if math.isnan(h) else f"[{m - h:.1%}, {m + h:.1%}]"


def markdown(table: dict[str, dict[str, Any]], arms: dict[str, ArmRuns], cfg: StudyConfig, generated_by: str) -> str:
    """report.md: settings, the per-arm table, the paired differences and the figures' links."""
    ref = bool(cfg.reference_dir)
    lines = [
        "# Stability study",
        "",
        generated_by,
        f"Base config `{cfg.base_config}`, common overrides `{' '.join(cfg.common) or '-'}`, seeds {cfg.seeds}."
        + (f" Arms marked (ref) are the runs of `{cfg.reference_dir}`, same base config and overrides." * ref),
        "",
        f"Collapse rule: final validation accuracy below {1 - cfg.collapse_drop:.0%} of the run's best "
        "(with best >= 5%). Validation: greedy accuracy on 200 held-out problems (+- about 3 points is noise); "
        "sampled: pass@1 at the rollout temperature, `eval_samples` responses per problem (n/a when not logged).",
        "",
        "Confidence intervals: 95%, Student's t over seeds (mean +- t(0.975, n-1) s / sqrt(n)); the differences "
        "are paired by seed (the same first rollout batch).",
        "",
        f"| arm | overrides | seeds | steps | final val acc | val acc, last {LATE_CHECKS} checks | "
        f"last {LATE_CHECKS} checks, 95% CI | best val acc | "
        "final sampled val acc | collapsed | "
        + " | ".join(f"steps to {lvl:.0%}" for lvl in cfg.accuracy_levels)
        + " | clip fraction | ratio std (off-policy) | gamma (off-policy) | tokens gamma < 0.95 (off-policy) "
        + "| non-shifted ratio | token entropy | grad var across mini-batches |",
        "|" + "---|" * (17 + len(cfg.accuracy_levels)),
    ]
    for arm, t in table.items():
        reach = [", ".join("-" if s is None else str(s) for s in t["reach"][lvl]) for lvl in cfg.accuracy_levels]
        lines.append(
            f"| {arm} | `{' '.join(arms[arm].overrides)}` | {t['seeds']} | {t['steps']} | {_ms(t['final'])} | "
            f"{_ms(t['late'])} | {_ci(t['late_ci'])} | "
            f"{_ms(t['best'])} | {_ms(t['sampled'])} | "
            f"{t['collapsed']}/{t['seeds']} | " + " | ".join(reach) + f" | {_ms(t['clip'], False)} | "
            f"{_ms(t['ratio_std'], False)} | {_ms(t['gamma'], False)} | {_ms(t['below95'])} | "
            f"{_ms(t['nsr'], False)} | {_ms(t['entropy'], False)} | {_ms(t['gvar'], False)} |"
        )
    diffs = paired_differences({arm: t["late_per_seed"] for arm, t in table.items()}, cfg.compare)
    if diffs:
        lines += [
            "",
            f"Differences in validation accuracy (last {LATE_CHECKS} checks), paired by seed:",
            "",
            "| arm | minus | seeds | mean difference | 95% CI | the interval excludes 0 |",
            "|---|---|---|---|---|---|",
        ]
        for d in diffs:
            lo, hi = d["diff"] - d["half"], d["diff"] + d["half"]
            sig = "n/a" if math.isnan(d["half"]) else ("yes" if lo > 0 or hi < 0 else "no")
            lines.append(
                f"| {d['arm']} | {d['baseline']} | {d['seeds']} | {d['diff']:+.1%} | [{lo:+.1%}, {hi:+.1%}] | {sig} |"
            )
    lines += _rollout_table(arms)
    lines += ["", "![final](final.png)", "", "![curves](curves.png)", "", "![gamma](gamma.png)", ""]
    return "\n".join(lines)


ROLLOUT_COLUMNS = (
    ("rollout/routing_disagree_tokens", "tokens whose rollout experts differ from the trainer's (any layer)", True),
    ("rollout/own/logp_diff_mean", "mean abs log-prob diff, trainer's own routing", False),
    ("rollout/replayed/logp_diff_mean", "the same, the rollout's experts replayed", False),
    ("rollout/own/logp_diff_max", "max abs log-prob diff, own routing", False),
    ("rollout/replayed/logp_diff_max", "max abs log-prob diff, replayed", False),
    ("rollout/own/kl_k3", "KL(rollout || trainer), own routing", False),
    ("rollout/replayed/kl_k3", "the same, replayed", False),
)


def _rollout_table(arms: dict[str, ArmRuns]) -> list[str]:
    """The rollout's routing against the trainer's, per arm (runs that recorded the rollout's routing only):
    each column the mean over steps, then mean +- std over seeds."""
    key = ROLLOUT_COLUMNS[0][0]
    shown = {a: r for a, r in arms.items() if any(key in row for rows in r.runs.values() for row in rows)}
    if not shown:
        return []
    lines = [
        "",
        "The rollout against the trainer (mean over steps, then mean +- std over seeds):",
        "",
        "| arm | " + " | ".join(c[1] for c in ROLLOUT_COLUMNS) + " |",
        "|" + "---|" * (1 + len(ROLLOUT_COLUMNS)),
    ]
    for arm, a in shown.items():
        cells = []
        for k, _, pct in ROLLOUT_COLUMNS:
            per_seed = [sum(v) / len(v) for rows in a.runs.values() if (v := [r[k] for r in rows if k in r])]
            cells.append(_ms(mean_std(per_seed), pct))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def results(arms: dict[str, ArmRuns], cfg: StudyConfig) -> dict[str, Any]:
    """What the report is computed from, per seed, so anyone can recompute its intervals: every run's
    validation checks (greedy and sampled accuracy), its per-step traces (``TRACE_KEYS``) and its summary
    row. Non-finite values are null."""
    out: dict[str, Any] = {
        "study": {"base_config": cfg.base_config, "common": cfg.common, "collapse_drop": cfg.collapse_drop},
        "arms": {},
    }
    for arm, a in arms.items():
        runs = {}
        for seed, rows in a.runs.items():
            checks = [
                {"step": r["step"], "accuracy": r["val/accuracy"], "accuracy_sampled": r.get("val/accuracy_sampled")}
                for r in rows
                if "val/accuracy" in r
            ]
            traces = {k: [[st, v] for st, v in series(rows, k).items()] for k in TRACE_KEYS}
            runs[str(seed)] = {
                "checks": checks,
                "traces": {k: v for k, v in traces.items() if v},
                "summary": _seed_summary(cfg, seed, rows),
            }
        out["arms"][arm] = {"overrides": a.overrides, "runs": runs}
    return json_ready(out)


def json_ready(x: Any) -> Any:
    """``x`` with non-finite floats as None and every mapping key a string (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


def write_report(
    study_dir: str | Path, command: str | None = None, out: str | Path | None = None, overwrite: bool = False
) -> Path:
    """report.md, results.json and figures (final.png, curves.png, gamma.png) into ``out`` (default:
    ``study_dir``, where the report is part of the study and rewritten each time). Another ``out`` must be
    new, empty, or (``overwrite``) hold an earlier report."""
    study_dir = Path(study_dir)
    if not (study_dir / "study.yaml").is_file():
        raise FileNotFoundError(f"{study_dir} has no study.yaml: not a study directory")
    cfg = load_config(StudyConfig, study_dir / "study.yaml")
    cfg.out_dir = str(study_dir)
    arms = load_runs(cfg)  # reads (and checks) everything before writing anything
    dest = RunDir.existing(study_dir, "study") if out is None else RunDir.create(out, "report", overwrite=overwrite)
    for name in REPORT_FILES:
        dest.claim(name)
    table = summarize(cfg, arms)
    figures(table, arms, dest.path)
    generated_by = (
        f"Generated by `rspo report {study_dir}{'' if out is None else f' --out {out}'}` from the runs of "
        f"`{command or 'rspo study <config>'}`."
    )
    dest.write_json("results.json", results(arms, cfg))
    return dest.write_text("report.md", markdown(table, arms, cfg, generated_by))
