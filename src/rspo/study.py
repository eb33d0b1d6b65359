"""``rspo study``: a resumable grid of ``rspo train`` runs (arm x seed); ``rspo report``: report.md and figures.

    rspo study configs/study-countdown.yaml           # finished runs are skipped, interrupted ones resume
    rspo report runs/study-countdown                   # report.md + PNG figures in the study directory

Each run is a subprocess (``python -m rspo.cli train ...``) with one torch thread; up to
``parallel`` run at once. A finished run has ``done.json``; a started one without it is continued
with ``--resume`` (from its last checkpoint, or from step 0 if it had none).
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rspo.config import load_config
from rspo.rundir import RunDir, is_collapsed, read_metrics, steps_logged


@dataclass
class StudyConfig:
    base_config: str = "configs/demo.yaml"
    """Train config (YAML) every run starts from."""
    out_dir: str = "runs/study"
    """Study directory: one sub-directory per arm, one per seed inside."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of every arm."""
    common: list[str] = field(default_factory=list)
    """Overrides applied to every run (dotted field=value)."""
    arms: dict[str, list[str]] = field(default_factory=dict)
    """Arm name -> overrides (e.g. rspo: [objective.name=rspo])."""
    parallel: int = 2
    """Runs at once (default: the number of cores), one torch thread each."""
    accuracy_levels: list[float] = field(default_factory=lambda: [0.35, 0.40])
    """Validation accuracies for the steps-to-reach column of the report."""
    collapse_drop: float = 0.5
    """Collapse rule for the report: final validation accuracy below (1 - collapse_drop) x the best."""
    reference_dir: str | None = None
    """Another study directory whose ``reference_arms`` the report shows next to these arms (same
    base config and common overrides required), e.g. ablations against the main arms."""
    reference_arms: list[str] = field(default_factory=list)
    """Arms of ``reference_dir`` to show (labelled ``<arm> (ref)``)."""
    compare: list[str] = field(default_factory=list)
    """Pairs ``"arm - baseline"`` (``<arm> (ref)`` for a reference arm) for the report's table of
    differences, paired by seed; empty = every pair of this study's arms."""

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("study.arms is empty")
        if not self.seeds or self.parallel < 1:
            raise ValueError("study.seeds must be non-empty and parallel >= 1")
        bad = [a for a in self.arms if not a.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"arm names must be letters, digits, - and _: {bad}")
        if bool(self.reference_dir) != bool(self.reference_arms):
            raise ValueError("study.reference_dir and study.reference_arms go together (both set or neither)")
        for pair in self.compare:
            if len(pair.split(" - ")) != 2:
                raise ValueError(f"study.compare: {pair!r} is not 'arm - baseline'")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds has repeated seeds: {self.seeds}")
        if not all(0 <= a <= 1 for a in self.accuracy_levels):
            raise ValueError(f"study.accuracy_levels must lie in [0, 1], got {self.accuracy_levels}")
        if not 0 < self.collapse_drop < 1:
            raise ValueError(f"study.collapse_drop must be in (0, 1), got {self.collapse_drop}")


def run_dirs(cfg: StudyConfig) -> list[tuple[str, int, Path]]:
    return [(arm, seed, Path(cfg.out_dir) / arm / f"seed{seed}") for arm in cfg.arms for seed in cfg.seeds]


@dataclass
class Job:
    """One subprocess of a grid: ``cmd`` writes into ``run``; progress is ``units`` (e.g. steps), of which
    ``progress()`` are done so far; ``finish()`` runs after a zero exit code (e.g. writes done.json)."""

    run: Path
    cmd: list[str]
    units: int
    progress: Callable[[], int]
    finish: Callable[[], None]


def run_jobs(jobs: list[Job], parallel: int, desc: str, done_units: int = 0, total_units: int | None = None,
             progress: bool = True, postfix: Callable[[], dict[str, str]] | None = None) -> dict[str, str]:  # fmt: skip
    """Run ``jobs`` as subprocesses, ``parallel`` at a time, with one progress bar (rate and ETA over this
    call's units only: ``done_units`` of ``total_units`` count as done before; ``postfix()`` adds live
    values). Each job's output goes to ``RUN.log`` beside its directory. Returns {run: "done" | "failed (...)"}."""
    todo, status = list(jobs), {}
    total = total_units if total_units is not None else done_units + sum(j.units for j in jobs)
    bar = tqdm(total=total, initial=done_units, desc=desc, disable=not progress, unit="step")
    seen = {str(j.run): j.progress() for j in jobs}
    running: list[tuple[Job, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            job.run.parent.mkdir(parents=True, exist_ok=True)
            log = (job.run.parent / f"{job.run.name}.log").open("w")
            running.append((job, subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(1.0)
        if postfix is not None and progress:
            bar.set_postfix(postfix(), refresh=False)
        for item in list(running):
            job, proc = item
            now = job.progress()
            bar.update(now - seen[str(job.run)])
            seen[str(job.run)] = now
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode == 0:
                    job.finish()
                    status[str(job.run)] = "done"
                else:
                    status[str(job.run)] = (
                        f"failed (exit {proc.returncode}; see {job.run.parent / (job.run.name + '.log')})"
                    )
                    tqdm.write(f"run {job.run} failed: {status[str(job.run)]}")
    bar.close()
    return status


def train_job(run: Path, base_config: str, overrides: list[str]) -> tuple[Job | None, int]:
    """The job of one ``rspo train`` run (None if it finished before) and its number of steps; the run's
    config is validated now. A run started before is continued (``--resume``: from its last checkpoint, or
    from step 0 if it had none)."""
    from rspo.train_config import TrainConfig

    steps = load_config(TrainConfig, base_config, overrides).steps
    if (run / "done.json").exists():
        return None, steps
    if RunDir.inspect(run) if run.is_dir() else None:
        cmd = [sys.executable, "-m", "rspo.cli", "train", "--resume", str(run)]
    else:
        cmd = [sys.executable, "-m", "rspo.cli", "train", base_config, *overrides]

    def finish() -> None:
        RunDir.existing(run, "train").write_json("done.json", {"steps": steps_logged(run)})

    return Job(run, cmd, steps, lambda: steps_logged(run), finish), steps


def run_study(cfg: StudyConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the grid; returns {run_dir: status}."""
    jobs, status, total_steps = [], {}, 0
    for arm, seed, run in run_dirs(cfg):
        job, steps = train_job(run, cfg.base_config, [*cfg.common, *cfg.arms[arm], f"seed={seed}", f"out_dir={run}",
                                                      "threads=1"])  # fmt: skip
        total_steps += steps
        if job is None:
            status[str(run)] = "done (skipped)"
        else:
            jobs.append(job)
    study = RunDir.open_or_create(cfg.out_dir, "study")  # only after every run's config was validated
    study.write_config(cfg, "study.yaml")
    for arm in cfg.arms:
        study.claim(arm)
    done = sum(steps_logged(r) for _, _, r in run_dirs(cfg))  # counted as done: rate and ETA are this call's
    status |= run_jobs(jobs, cfg.parallel, f"study ({len(jobs)} runs to go)", done, total_steps, progress)
    return status


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------
CURVES = [
    ("reward/mean", "reward (mean, smoothed over 10 steps)", 10),
    ("val/accuracy", "validation accuracy (greedy)", 1),
    ("val/accuracy_sampled", "validation accuracy (sampled at the rollout temperature)", 1),
    ("clip_ratio/region_mean", "clip fraction (active clip)", 10),
    ("offpolicy/ratio_std", "importance-ratio std (off-policy updates)", 10),
    ("offpolicy/ratio_max", "importance-ratio max (off-policy updates)", 10),
    ("offpolicy/router_gamma_mean", "gamma mean (off-policy updates)", 10),
    ("router/gamma_p10", "gamma p10", 10),
    ("offpolicy/router_non_shifted_ratio", "non-shifted routing ratio (off-policy)", 10),
    ("entropy/mean", "token entropy", 10),
    ("grad/norm", "gradient norm", 10),
    ("grad/minibatch_var", "gradient variance across mini-batches", 10),
]


LATE_CHECKS = 3
"""The report's less noisy accuracy: the mean of each run's last LATE_CHECKS validation checks."""


def _series(rows: list[dict], key: str, smooth: int) -> dict[int, float]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    out = {}
    for i, (s, _) in enumerate(pts):
        window = [v for _, v in pts[max(0, i - smooth + 1) : i + 1]]
        out[s] = sum(window) / len(window)
    return out


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


def mean_ci(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its two-sided ``level`` confidence interval, Student's t with n - 1
    degrees of freedom (seeds as independent draws); NaN half-width with fewer than 2 values."""
    xs = _finite(xs)
    if len(xs) < 2:
        return (xs[0] if xs else float("nan")), float("nan")
    return statistics.mean(xs), t_quantile((1 + level) / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def paired_differences(table: dict[str, dict[str, Any]], compare: list[str]) -> list[dict[str, Any]]:
    """Per pair ``"arm - baseline"``: the mean over common seeds of arm - baseline in the late validation
    accuracy (mean of the last checks), with its 95% t interval. Seeds pair runs that start from the same
    first rollout batch. ``compare`` empty: every pair of arms, in table order. A pair naming an arm
    without runs is an error."""
    arms = list(table)
    pairs = [tuple(p.split(" - ")) for p in compare] if compare else [
        (a, b) for i, b in enumerate(arms) for a in arms[i + 1 :]]  # fmt: skip
    out = []
    for a, b in pairs:
        missing = [x for x in (a, b) if x not in table]
        if missing:
            raise ValueError(f"study.compare: {a} - {b}: no runs for {missing} (arms: {arms})")
        la, lb = table[a]["late_per_seed"], table[b]["late_per_seed"]
        common = sorted(set(la) & set(lb))
        d = [la[s] - lb[s] for s in common if la[s] is not None and lb[s] is not None]
        m, h = mean_ci(d)
        out.append({"arm": a, "baseline": b, "seeds": len(d), "diff": m, "half": h})
    return out


def _finite(xs: list[float | None]) -> list[float]:
    return [x for x in xs if x is not None and math.isfinite(x)]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = _finite(xs)
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


@dataclass
class ArmRuns:
    """One arm of a report: its overrides and every seed's metrics rows ([] for a run not started)."""

    overrides: list[str]
    runs: dict[int, list[dict]]


def _arm_runs(study: StudyConfig, names: Iterable[str]) -> dict[str, ArmRuns]:
    """``names`` (arms of ``study``, in that order) with every seed's metrics, read once."""
    arms = {arm: ArmRuns(study.arms[arm], {}) for arm in names}
    for arm, seed, run in run_dirs(study):
        if arm in arms:
            arms[arm].runs[seed] = read_metrics(run, missing_ok=True)
    return arms


def load_runs(cfg: StudyConfig) -> dict[str, ArmRuns]:
    """Every run's metrics, read once: this study's arms, then the reference arms as ``<arm> (ref)``."""
    arms = _arm_runs(cfg, cfg.arms)
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


def summarize(cfg: StudyConfig, arms: dict[str, ArmRuns] | None = None) -> dict[str, dict[str, Any]]:
    """Per arm: final/best validation accuracy over seeds, collapses, steps to reach, clip fraction, ratio std."""
    arms = load_runs(cfg) if arms is None else arms
    table: dict[str, dict[str, Any]] = {}
    for arm, a in arms.items():
        per_seed = []
        for seed, rows in a.runs.items():
            val = [(r["step"], r["val/accuracy"]) for r in rows if "val/accuracy" in r]
            if not val:
                continue
            best = max(v for _, v in val)
            final = val[-1][1]
            reach = {lvl: next((s for s, v in val if v >= lvl), None) for lvl in cfg.accuracy_levels}
            sampled = [r["val/accuracy_sampled"] for r in rows if "val/accuracy_sampled" in r]
            upd = [r for r in rows if "clip_ratio/region_mean" in r]

            def avg(key, rows=upd):
                vals = [r[key] for r in rows if key in r]
                return sum(vals) / len(vals) if vals else float("nan")

            per_seed.append({
                "seed": seed, "below95": avg("offpolicy/router_gamma_below_0.95"), "entropy": avg("entropy/mean"),
                "final": final, "best": best, "collapsed": is_collapsed(final, best, cfg.collapse_drop),
                "late": statistics.mean(v for _, v in val[-LATE_CHECKS:]) if len(val) > LATE_CHECKS else None,
                "sampled": sampled[-1] if sampled else None, "reach": reach, "clip": avg("clip_ratio/region_mean"),
                "ratio_std": avg("offpolicy/ratio_std"),
                "gamma": avg("offpolicy/router_gamma_mean"), "nsr": avg("offpolicy/router_non_shifted_ratio"),
                "gvar": avg("grad/minibatch_var"), "steps": rows[-1]["step"] if rows else 0,
            })  # fmt: skip
        if not per_seed:
            continue
        table[arm] = {
            "seeds": len(per_seed),
            "final_per_seed": [p["final"] for p in per_seed],
            "best_per_seed": [p["best"] for p in per_seed],
            "final": _mean_std([p["final"] for p in per_seed]),
            "best": _mean_std([p["best"] for p in per_seed]),
            "late": _mean_std([p["late"] for p in per_seed]),
            "late_ci": mean_ci([p["late"] for p in per_seed]),
            "late_per_seed": {p["seed"]: p["late"] for p in per_seed},
            "below95": _mean_std([p["below95"] for p in per_seed]),
            "entropy": _mean_std([p["entropy"] for p in per_seed]),
            "sampled": _mean_std([p["sampled"] for p in per_seed]),
            "collapsed": sum(p["collapsed"] for p in per_seed),
            "reach": {lvl: [p["reach"][lvl] for p in per_seed] for lvl in cfg.accuracy_levels},
            "clip": _mean_std([p["clip"] for p in per_seed]),
            "ratio_std": _mean_std([p["ratio_std"] for p in per_seed]),
            "gamma": _mean_std([p["gamma"] for p in per_seed]),
            "nsr": _mean_std([p["nsr"] for p in per_seed]),
            "gvar": _mean_std([p["gvar"] for p in per_seed]),
            "steps": min(p["steps"] for p in per_seed),
        }
    return table


REPORT_FILES = ("report.md", "curves.png", "gamma.png", "final.png")


def write_report(
    study_dir: str | Path, command: str | None = None, out: str | Path | None = None, overwrite: bool = False
) -> Path:
    """report.md and figures (final.png, curves.png, gamma.png) into ``out`` (default: ``study_dir``, where
    the report is part of the study and rewritten each time). Another ``out`` must be new, empty, or
    (``overwrite``) hold an earlier report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study_dir = Path(study_dir)
    if not (study_dir / "study.yaml").is_file():
        raise FileNotFoundError(f"{study_dir} has no study.yaml: not a study directory")
    cfg = load_config(StudyConfig, study_dir / "study.yaml")
    cfg.out_dir = str(study_dir)
    arms = load_runs(cfg)  # reads (and checks) everything before writing anything
    if out is None:
        dest = RunDir.existing(study_dir, "study")
    else:
        dest = RunDir.create(out, "report", overwrite=overwrite)
    out_dir = dest.path
    for name in REPORT_FILES:
        dest.claim(name)
    table = summarize(cfg, arms)
    colors = plt.get_cmap("tab20" if len(table) > 10 else "tab10").colors
    color = {arm: colors[i % len(colors)] for i, arm in enumerate(table)}
    # curves with a band (min..max over seeds) per arm
    n = len(CURVES)
    cols = 4
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(20, 4.2 * math.ceil(n / cols)))
    for ax, (key, title, smooth) in zip(axes.flat, CURVES, strict=False):
        for arm in table:
            seeds = [_series(rows, key, smooth) for rows in arms[arm].runs.values()]
            seeds = [s for s in seeds if s]
            if not seeds:
                continue
            steps = sorted(set.intersection(*(set(s) for s in seeds)))
            mean = [statistics.mean(s[t] for s in seeds) for t in steps]
            lo = [min(s[t] for s in seeds) for t in steps]
            hi = [max(s[t] for s in seeds) for t in steps]
            ax.plot(steps, mean, label=arm, lw=1.3, color=color[arm], ls="--" if arm.endswith("(ref)") else "-")
            ax.fill_between(steps, lo, hi, color=color[arm], alpha=0.12)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("mean over seeds, band = min..max over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)
    plt.close(fig)
    # gamma distribution: per-step p10 and mean of the off-policy updates, pooled over seeds
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for arm in table:
        for j, key in enumerate(("offpolicy/router_gamma_mean", "router/gamma_p10")):
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

    def ms(x, pct=True):
        m, s = x
        if math.isnan(m):
            return "n/a"
        return f"{m:.1%} +- {s:.1%}" if pct else f"{m:.4g} +- {s:.2g}"

    def ci(x):
        m, h = x
        return "n/a" if math.isnan(h) else f"[{m - h:.1%}, {m + h:.1%}]"

    ref = bool(cfg.reference_dir)
    lines = [
        "# Stability study",
        "",
        f"Generated by `rspo report {study_dir}{'' if out is None else f' --out {out}'}` from the runs of "
        f"`{command or 'rspo study <config>'}`.",
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
            f"| {arm} | `{' '.join(arms[arm].overrides)}` | {t['seeds']} | {t['steps']} | {ms(t['final'])} | "
            f"{ms(t['late'])} | {ci(t['late_ci'])} | "
            f"{ms(t['best'])} | {ms(t['sampled'])} | "
            f"{t['collapsed']}/{t['seeds']} | " + " | ".join(reach) + f" | {ms(t['clip'], False)} | "
            f"{ms(t['ratio_std'], False)} | {ms(t['gamma'], False)} | {ms(t['below95'])} | {ms(t['nsr'], False)} | "
            f"{ms(t['entropy'], False)} | {ms(t['gvar'], False)} |"
        )
    diffs = paired_differences(table, cfg.compare)
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
            lines.append(f"| {d['arm']} | {d['baseline']} | {d['seeds']} | {d['diff']:+.1%} | "
                         f"[{lo:+.1%}, {hi:+.1%}] | {sig} |")  # fmt: skip
    lines += ["", "![final](final.png)", "", "![curves](curves.png)", "", "![gamma](gamma.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
