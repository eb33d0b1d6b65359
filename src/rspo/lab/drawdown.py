"""``rspo drawdown-report``: the pre-registered heavy-drift experiment's analysis (docs/study/heavy-drift/DESIGN.md).

Does RSPO keep training stable where routing drift is heavy? The primary metric is each run's drawdown
``D`` = mean training reward over an early window minus the mean over a late window (fixed windows: a
running maximum would be biased by noise). The verdict follows rules fixed before the data
(:class:`Design`):

- gates: G1, the mean share of off-policy tokens with gamma < 0.95 is at least ``g1_below95`` in both
  GRPO and RSPO; G2, GRPO's mean D is at least ``g2_min_d`` with the lower end of its two-sided 95%
  interval above 0. If either fails the verdict is "untestable here", not a null;
- delta = D(GRPO) - D(RSPO), paired by seed: "RSPO more stable" when the one-sided 95% lower bound is above
  0 and delta >= ``margin``; "not more stable" when the two-sided 90% interval lies within +-``margin``
  (equivalence); otherwise "inconclusive";
- collapses (the trainer's rule) compared with Fisher's exact test;
- attribution: replay of the old pass's expert indices (drift removed) must cut GRPO's D by at least
  ``replay_cut``, else the instability is not routing drift; RSPO - GMPO isolates gamma; GMPO at RSPO's
  mean-gamma-scaled learning rate asks whether gamma acts as a per-token learning rate.

Arms are read by name (``grpo``, ``rspo``, ``grpo_replay``, ``gmpo``, ``gmpo_lr_gamma``; a reference arm's
`` (ref)`` suffix is dropped), from one study directory whose reference arms may hold the others.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rspo.config import load_config
from rspo.lab.metrics import BELOW_95_OFF, GAMMA_OFF, RATIO_MAX_OFF
from rspo.lab.report import LATE_CHECKS, ArmRuns, json_ready, load_runs, results
from rspo.lab.stats import finite, t_quantile
from rspo.lab.study import StudyConfig
from rspo.rundir import RunDir
from rspo.trainer import is_collapsed

BASELINE, TREATMENT, REPLAY, GMPO, GMPO_LR = "grpo", "rspo", "grpo_replay", "gmpo", "gmpo_lr_gamma"
VERDICTS = ("RSPO more stable", "not more stable", "inconclusive", "untestable here")


@dataclass(frozen=True)
class Design:
    """The pre-registered constants (steps are inclusive windows of logged training steps)."""

    early: tuple[int, int] = (6, 15)
    late: tuple[int, int] = (31, 40)
    g1_below95: float = 0.15
    g2_min_d: float = 0.04
    margin: float = 0.02
    replay_cut: float = 0.25
    pilot_min_d: float = 0.04


def window_mean(rows: list[dict], key: str, window: tuple[int, int]) -> float:
    """Mean of ``key`` over the logged steps in ``window`` (inclusive); NaN when none is logged."""
    vals = finite(r.get(key) for r in rows if window[0] <= r.get("step", -1) <= window[1])
    return statistics.mean(vals) if vals else math.nan


def drawdown(rows: list[dict], design: Design = Design()) -> float:
    """D = mean training reward over the early window - mean over the late window (positive: it fell)."""
    return window_mean(rows, "reward/mean", design.early) - window_mean(rows, "reward/mean", design.late)


def run_numbers(rows: list[dict], design: Design, collapse_drop: float) -> dict[str, Any]:
    """One run's primary and secondary numbers."""
    val = [(r["step"], r["val/accuracy"]) for r in rows if "val/accuracy" in r]
    sampled = [r["val/accuracy_sampled"] for r in rows if "val/accuracy_sampled" in r]
    upd = [r for r in rows if "reward/mean" in r]

    def avg(key: str) -> float:
        vals = finite(r.get(key) for r in upd)
        return statistics.mean(vals) if vals else math.nan

    best = max((v for _, v in val), default=math.nan)
    final = val[-1][1] if val else math.nan
    return {
        "D": drawdown(rows, design),
        "late": statistics.mean(v for _, v in val[-LATE_CHECKS:]) if len(val) >= LATE_CHECKS else math.nan,
        "late_sampled": statistics.mean(sampled[-LATE_CHECKS:]) if len(sampled) >= LATE_CHECKS else math.nan,
        "collapsed": bool(val) and is_collapsed(final, best, collapse_drop),
        "below95": avg(BELOW_95_OFF),
        "gamma": avg(GAMMA_OFF),
        "ratio_max": avg(RATIO_MAX_OFF),
        "grad_norm": avg("grad/norm"),
        "steps": upd[-1]["step"] if upd else 0,
    }


def mean_interval(xs: list[float], level: float, sided: str = "two") -> tuple[float, float, float]:
    """(mean, lower, upper) of Student's t interval over ``xs``; ``sided='lower'``: a one-sided ``level`` lower
    bound (upper = +inf). NaN bounds with fewer than 2 values."""
    xs = finite(xs)
    if not xs:
        return math.nan, math.nan, math.nan
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, math.nan, math.nan
    se = statistics.stdev(xs) / math.sqrt(len(xs))
    if sided == "lower":
        return m, m - t_quantile(level, len(xs) - 1) * se, math.inf
    h = t_quantile(0.5 + level / 2, len(xs) - 1) * se
    return m, m - h, m + h


def paired(base: dict[int, float], arm: dict[int, float]) -> dict[int, float]:
    """base - arm per seed present and finite in both."""
    return {s: base[s] - arm[s] for s in sorted(set(base) & set(arm)) if math.isfinite(base[s] - arm[s])}


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p of Fisher's exact test on the 2x2 table [[a, b], [c, d]]: the probability, under the
    hypergeometric law with the margins fixed, of a table no more likely than the observed one."""
    n, row1, col1 = a + b + c + d, a + b, a + c

    def prob(x: int) -> float:
        return math.comb(col1, x) * math.comb(n - col1, row1 - x) / math.comb(n, row1)

    observed = prob(a)
    lo, hi = max(0, row1 + col1 - n), min(row1, col1)
    return min(1.0, sum(p for x in range(lo, hi + 1) if (p := prob(x)) <= observed * (1 + 1e-9)))


def verdict(delta: list[float], g1: bool, g2: bool, design: Design) -> str:
    """The pre-registered decision on the paired deltas D(GRPO) - D(RSPO)."""
    if not (g1 and g2):
        return "untestable here"
    m, lower95, _ = mean_interval(delta, 0.95, "lower")
    _, lo90, hi90 = mean_interval(delta, 0.90)
    if lower95 > 0 and m >= design.margin:
        return "RSPO more stable"
    if -design.margin <= lo90 and hi90 <= design.margin:
        return "not more stable"
    return "inconclusive"


def analyse(arms: dict[str, dict[int, list[dict]]], design: Design = Design(), collapse_drop: float = 0.5) -> dict:
    """Every number of the report from ``{arm: {seed: metrics rows}}`` (arms by the names above)."""
    per_run = {
        a: {s: run_numbers(rows, design, collapse_drop) for s, rows in runs.items() if rows} for a, runs in arms.items()
    }

    def col(arm: str, key: str) -> dict[int, float]:
        return {s: n[key] for s, n in per_run.get(arm, {}).items()}

    def summary(arm: str) -> dict[str, Any]:
        runs = per_run.get(arm, {})
        out = {"seeds": len(runs), "collapsed": sum(n["collapsed"] for n in runs.values())}
        for key in ("D", "late", "late_sampled", "below95", "gamma", "ratio_max", "grad_norm"):
            m, lo, hi = mean_interval(list(col(arm, key).values()), 0.95)
            out[key] = {"mean": m, "ci95": [lo, hi]}
        return out

    res: dict[str, Any] = {"design": design.__dict__, "arms": {a: summary(a) for a in per_run}, "runs": per_run}
    if BASELINE in per_run:  # the pilot has GRPO only: its rule picks the learning rate
        res["pilot_rule_met"] = res["arms"][BASELINE]["D"]["mean"] >= design.pilot_min_d
    if BASELINE in per_run and TREATMENT in per_run:
        g1 = all(res["arms"][a]["below95"]["mean"] >= design.g1_below95 for a in (BASELINE, TREATMENT))
        d = res["arms"][BASELINE]["D"]
        g2 = d["mean"] >= design.g2_min_d and d["ci95"][0] > 0
        delta = paired(col(BASELINE, "D"), col(TREATMENT, "D"))
        m, lower95, _ = mean_interval(list(delta.values()), 0.95, "lower")
        _, lo90, hi90 = mean_interval(list(delta.values()), 0.90)
        cg, ct = res["arms"][BASELINE], res["arms"][TREATMENT]
        res["primary"] = {
            "G1": g1,
            "G2": g2,
            "delta": {"per_seed": delta, "mean": m, "lower95_one_sided": lower95, "ci90": [lo90, hi90]},
            "verdict": verdict(list(delta.values()), g1, g2, design),
            "collapses": {
                "grpo": [cg["collapsed"], cg["seeds"]],
                "rspo": [ct["collapsed"], ct["seeds"]],
                "fisher_p": fisher_exact(
                    cg["collapsed"], cg["seeds"] - cg["collapsed"], ct["collapsed"], ct["seeds"] - ct["collapsed"]
                ),
            },
        }
        res["lr_gamma_factor"] = ct["gamma"]["mean"]  # GMPO's lr is scaled by RSPO's mean off-policy gamma
    if BASELINE in per_run and REPLAY in per_run:
        grpo_d, rep_d = col(BASELINE, "D"), col(REPLAY, "D")
        seeds = [s for s in rep_d if s in grpo_d and math.isfinite(grpo_d[s]) and math.isfinite(rep_d[s])]
        base = statistics.mean(grpo_d[s] for s in seeds) if seeds else math.nan  # on the replay arm's seeds
        rep = statistics.mean(rep_d[s] for s in seeds) if seeds else math.nan
        cut = 1 - rep / base if base > 0 else math.nan  # no drawdown to cut: undefined
        res["attribution"] = {"replay_cut": cut, "seeds": len(seeds), "drift_explains": bool(cut >= design.replay_cut)}
    for other in (GMPO, GMPO_LR):
        if TREATMENT in per_run and other in per_run:
            diff = paired(col(other, "D"), col(TREATMENT, "D"))  # D(other) - D(RSPO): > 0, RSPO fell less
            m, lo, hi = mean_interval(list(diff.values()), 0.95)
            acc = paired(col(TREATMENT, "late"), col(other, "late"))
            am, alo, ahi = mean_interval(list(acc.values()), 0.95)
            res[f"rspo_vs_{other}"] = {"D_diff": [m, lo, hi], "late_acc_diff": [am, alo, ahi], "seeds": len(diff)}
    return res


# ----------------------------------------------------------------------------------------------- the report
def _arms_by_name(arms: dict[str, ArmRuns]) -> dict[str, dict[int, list[dict]]]:
    return {name.removesuffix(" (ref)"): a.runs for name, a in arms.items()}


def _f(x: float, pct: bool = False, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.1%}" if pct and signed else f"{x:.1%}" if pct else f"{x:+.3f}" if signed else f"{x:.3f}"


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def markdown(res: dict, generated_by: str) -> str:
    d = Design(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["design"].items()})
    lines = [
        "# Heavy drift: does RSPO hold? (pre-registered: DESIGN.md)",
        "",
        generated_by,
        "",
        f"D = mean training reward over steps {d.early[0]}-{d.early[1]} minus steps {d.late[0]}-{d.late[1]}. "
        "Intervals: Student's t over seeds, 95% unless stated.",
        "",
        "| arm | seeds | D, mean [95% CI] | late accuracy (last 3 checks) | sampled | collapsed "
        "| off-policy gamma < 0.95 "
        "| gamma | ratio max | grad norm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in res["arms"].items():
        D = s["D"]
        lines.append(
            f"| {arm} | {s['seeds']} | {_f(D['mean'])} [{_f(D['ci95'][0])}, {_f(D['ci95'][1])}] | "
            f"{_f(s['late']['mean'], True)} | {_f(s['late_sampled']['mean'], True)} | {s['collapsed']}/{s['seeds']} | "
            f"{_f(s['below95']['mean'], True)} | {_f(s['gamma']['mean'])} | {_f(s['ratio_max']['mean'])} | "
            f"{_f(s['grad_norm']['mean'])} |"
        )
    if "primary" in res:
        p = res["primary"]
        dl = p["delta"]
        c = p["collapses"]
        lines += [
            "",
            "## Verdict",
            "",
            f"- G1 (off-policy tokens below 0.95 >= {d.g1_below95:.0%} in GRPO and RSPO): **{_met(p['G1'])}**",
            f"- G2 (GRPO's mean D >= {d.g2_min_d} with its 95% lower bound above 0): **{_met(p['G2'])}**",
            f"- delta = D(GRPO) - D(RSPO), paired over {len(dl['per_seed'])} seeds: {_f(dl['mean'], signed=True)}, "
            f"one-sided 95% lower bound {_f(dl['lower95_one_sided'], signed=True)}, 90% interval "
            f"[{_f(dl['ci90'][0], signed=True)}, {_f(dl['ci90'][1], signed=True)}] (margin {d.margin})",
            f"- collapses: GRPO {c['grpo'][0]}/{c['grpo'][1]}, RSPO {c['rspo'][0]}/{c['rspo'][1]}, "
            f"Fisher's exact p = {c['fisher_p']:.3f}",
            "",
            f"**Verdict: {p['verdict']}.**",
        ]
    if "attribution" in res:
        a = res["attribution"]
        lines += [
            "",
            f"Attribution: replay of the old pass's expert indices cuts GRPO's D by {_f(a['replay_cut'], True)} "
            f"(rule: at least {d.replay_cut:.0%}): "
            + (
                "the instability is routing drift."
                if a["drift_explains"]
                else "**the instability is not routing drift**; any RSPO gain is generic."
            ),
        ]
    for other in (GMPO, GMPO_LR):
        if f"rspo_vs_{other}" in res:
            r = res[f"rspo_vs_{other}"]
            lines.append(
                f"- D({other}) - D(rspo) over {r['seeds']} seeds: {_f(r['D_diff'][0], signed=True)} "
                f"[{_f(r['D_diff'][1], signed=True)}, {_f(r['D_diff'][2], signed=True)}]; "
                f"late accuracy rspo - {other}: "
                f"{_f(r['late_acc_diff'][0], True, True)} [{_f(r['late_acc_diff'][1], True, True)}, "
                f"{_f(r['late_acc_diff'][2], True, True)}]"
            )
    if "lr_gamma_factor" in res:
        lines += [
            "",
            f"RSPO's mean off-policy gamma (the gmpo_lr_gamma arm's learning-rate factor): "
            f"{_f(res['lr_gamma_factor'])}",
        ]
    if "pilot_rule_met" in res and "primary" not in res:
        lines += [
            "",
            f"Pilot rule (GRPO's mean D >= {d.pilot_min_d}): **"
            + (
                "met: keep the learning rate"
                if res["pilot_rule_met"]
                else "not met: raise the learning rate, pilot again"
            )
            + "**.",
        ]
    return "\n".join(lines) + "\n"


def write_drawdown_report(
    study_dir: str | Path, out: str | Path | None = None, command: str | None = None, overwrite: bool = False
) -> Path:
    """report.md and results.json (the analysis, then every seed's checks and traces) into ``out`` (default:
    ``STUDY_DIR/drawdown``): a new or empty directory, or (``overwrite``) one holding an earlier one."""
    study_dir = Path(study_dir)
    if not (study_dir / "study.yaml").is_file():
        raise FileNotFoundError(f"{study_dir} has no study.yaml: not a study directory")
    cfg = load_config(StudyConfig, study_dir / "study.yaml")
    cfg.out_dir = str(study_dir)
    arms = load_runs(cfg)
    res = analyse(_arms_by_name(arms), Design(), cfg.collapse_drop)
    out = study_dir / "drawdown" if out is None else Path(out)
    dest = RunDir.create(out, "drawdown-report", overwrite=overwrite)
    for name in ("report.md", "results.json"):
        dest.claim(name)
    generated_by = (
        f"Generated by `rspo drawdown-report {study_dir} --out {out}` from the runs of "
        f"`{command or 'rspo study <config>'}`."
    )
    dest.write_json("results.json", {"analysis": json_ready(res), "data": results(arms, cfg)})
    return dest.write_text("report.md", markdown(res, generated_by))
