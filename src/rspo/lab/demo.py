"""``rspo demo``: GRPO and RSPO side by side from the shipped base policy, one process per core, with a
before/after table, the routing drift each run saw, and one figure with both."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rspo.config import load_config
from rspo.errors import FieldError
from rspo.evaluate import evaluate
from rspo.lab.jobs import run_jobs, train_job
from rspo.lab.metrics import GAMMA_OFF, drift_summary, last_with, run_metrics
from rspo.lab.plots import plot_runs
from rspo.policy import load_policy, resolve_model_path
from rspo.rundir import RunDir
from rspo.tasks import make_task
from rspo.train_config import TrainConfig

ARMS = {"grpo": ["objective.name=grpo", "router_shift.enabled=false"], "rspo": ["objective.name=rspo"]}
"""The demo's runs: the same config, GRPO (no router shift) and RSPO."""


@dataclass
class DemoConfig:
    """``rspo demo``: GRPO and RSPO side by side from one train config."""

    train_config: str = "configs/demo.yaml"
    """The train config both runs start from (relative to the current directory or the repository)."""
    overrides: list[str] = field(default_factory=list)
    """Overrides of the train config for both runs (dotted field=value)."""
    out_dir: str = "runs/demo"
    """The demo's directory: the two runs, the evaluations, curves.png and demo_summary.json."""
    eval_limit: int | None = None
    """Evaluate on the first N test problems only (None: the whole test split)."""

    def __post_init__(self) -> None:
        if self.eval_limit is not None and self.eval_limit < 1:
            raise FieldError("eval_limit", f"must be >= 1 (or null), got {self.eval_limit}")

    def config_path(self) -> Path:
        """The train config: as given, or relative to the repository (``rspo demo`` from any directory)."""
        p = Path(self.train_config)
        if p.is_file() or p.is_absolute():
            return p
        repo = Path(__file__).resolve().parents[3] / p
        return repo if repo.is_file() else p


def _live(runs: dict[str, Path]):
    """The progress bar's postfix: each arm's latest off-policy gamma (the first update of a batch is
    on-policy, where gamma is exactly 1) and reward."""

    def status() -> dict[str, str]:
        out = {}
        for arm, run in runs.items():
            last = last_with(run_metrics(run, missing_ok=True), GAMMA_OFF)
            if last:
                out[arm] = f"gamma_off {last[GAMMA_OFF]:.4f} reward {last['reward/mean']:.2f}"
        return out

    return status


def run_demo(demo_cfg: DemoConfig, overwrite: bool = False, progress: bool = True) -> int:
    """The demo into ``out_dir`` (new, empty, or with ``overwrite`` an earlier demo's output, which is
    replaced; any other directory is refused untouched). The runs are ``out_dir/grpo`` and ``out_dir/rspo``."""
    t0 = time.time()
    config, overrides = str(demo_cfg.config_path()), demo_cfg.overrides
    out_dir, eval_limit = demo_cfg.out_dir, demo_cfg.eval_limit
    cfg = load_config(TrainConfig, config, overrides)
    for over in ARMS.values():
        load_config(TrainConfig, config, [*overrides, *over])  # every arm's config is valid before we start
    task = make_task(cfg.task.name, cfg.task.parsed)
    loaded = []  # the base policy loads before the directory is made
    demo = RunDir.open_run(
        out_dir,
        "demo",
        overwrite=overwrite,
        before_create=lambda: loaded.append(
            load_policy(resolve_model_path(cfg.model), device=cfg.device, dtype=cfg.dtype)
        ),
    )
    base = loaded[0]
    try:
        out = demo.path
        runs = {arm: demo.claim(arm) for arm in ARMS}
        test = task.eval_examples("test")[:eval_limit]
        scorer = cfg.scoring.scorer(task)
        print(f"base policy: {base.path}; evaluating on {len(test)} test problems")
        before = [
            evaluate(base, task, test, greedy=g, seed=cfg.seed, progress=progress, scorer=scorer) for g in (True, False)
        ]
        print(
            f"RL: GRPO and RSPO side by side (one process each, one thread each), {cfg.steps} steps x "
            f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} responses, {cfg.updates_per_step} "
            f"updates per rollout batch (all but the first off-policy); logs: {out}/<arm>.log"
        )
        jobs = [
            train_job(run, config, [*overrides, *ARMS[arm], f"out_dir={run}", "threads=1"])[0]
            for arm, run in runs.items()
        ]
        status = run_jobs(
            [j for j in jobs if j], parallel=len(jobs), desc="demo", progress=progress, postfix=_live(runs)
        )
        failed = {k: v for k, v in status.items() if v.startswith("failed")}
        if failed:
            print(f"demo: a run failed: {failed}", file=sys.stderr)
            return 1
        after: dict[str, Any] = {}
        for arm, run in runs.items():
            pol = load_policy(run / "checkpoint", device=cfg.device, dtype=cfg.dtype)
            after[arm] = [
                evaluate(pol, task, test, greedy=g, seed=cfg.seed, progress=progress, scorer=scorer)
                for g in (True, False)
            ]
        scorer.close()
        demo.write_jsonl("test-before.jsonl", [r for res in before for r in res.records])
        for arm, res in after.items():
            demo.write_jsonl(f"test-after-{arm}.jsonl", [r for x in res for r in x.records])
        png = plot_runs(list(runs.values()), demo.claim("curves.png"), labels=[a.upper() for a in runs])
        drifts = {arm: drift_summary(run_metrics(run)) for arm, run in runs.items()}
        n = len(test)

        def cell(x: float) -> str:
            return f"{x:.1%} +-{math.sqrt(x * (1 - x) / max(n, 1)):.1%}"

        print(f"\n{task.name} test split ({n} problems)   {'base':>15s}" + "".join(f"{a.upper():>17s}" for a in runs))
        for i, name in enumerate(("greedy pass@1", "sampled pass@1 (T=1)")):
            print(
                f"  {name:31s}{cell(before[i].accuracy):>15s}"
                + "".join(f"{cell(after[a][i].accuracy):>17s}" for a in runs)
            )
        print("routing drift on the off-policy updates (mean over the run)")
        rows = (
            ("gamma_mean", "gamma (mean)", "{:.4f}"),
            ("below_0.95", "tokens with gamma < 0.95", "{:.1%}"),
            ("keep_all", "tokens keeping all experts", "{:.1%}"),
        )
        for key, name, fmt in rows:
            print(f"  {name:31s}{'':>15s}" + "".join(f"{fmt.format(drifts[a][key]):>17s}" for a in runs))
        collapse = {a: next((r["step"] for r in run_metrics(runs[a]) if r.get("val/collapsed")), None) for a in runs}
        print(
            "  collapse" + " " * 38 + "".join(f"{'none' if s is None else f'step {s}':>17s}" for s in collapse.values())
        )
        minutes = (time.time() - t0) / 60
        print(f"\ntotal time {minutes:.1f} min\nplot: {png}\nruns: {', '.join(str(r) for r in runs.values())}")
        demo.write_json(
            "demo_summary.json",
            {
                "before": {"greedy": before[0].accuracy, "sampled": before[1].accuracy},
                "after": {a: {"greedy": r[0].accuracy, "sampled": r[1].accuracy} for a, r in after.items()},
                "drift": drifts,
                "collapse_step": collapse,
                "minutes": minutes,
                "test_problems": n,
            },
        )
        return 0
    finally:
        demo.close()  # the lock, for a second demo in this process
