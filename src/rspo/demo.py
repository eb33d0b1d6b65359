"""``rspo demo``: GRPO and RSPO side by side from the shipped base policy, one process per core, with a
before/after table, the routing drift each run saw, and one figure with both."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from rspo.config import load_config
from rspo.evaluate import evaluate, write_jsonl
from rspo.plots import plot_runs
from rspo.policy import load_policy, resolve_model_path
from rspo.routing import histogram_share_below
from rspo.rundir import RunDir, read_metrics
from rspo.scoring import Scorer
from rspo.study import run_jobs, train_job
from rspo.tasks import make_task
from rspo.train_config import TrainConfig

ARMS = {"grpo": ["objective.name=grpo", "router_shift.enabled=false"], "rspo": ["objective.name=rspo"]}
"""The demo's runs: the same config, GRPO (no router shift) and RSPO."""


def _default_config() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / "configs" / "demo.yaml").is_file():
            return base / "configs" / "demo.yaml"
    raise FileNotFoundError("configs/demo.yaml not found (run from the repository root or pass --config)")


def drift(rows: list[dict]) -> dict[str, float]:
    """The routing drift a run saw on its off-policy updates, pooled over its steps."""
    hist: list[int] = []
    for r in rows:
        h = r.get("offpolicy/gamma_hist")
        if h:
            hist = [a + b for a, b in zip(hist, h, strict=True)] if hist else list(h)
    keep = [r["offpolicy/router_non_shifted_ratio"] for r in rows if "offpolicy/router_non_shifted_ratio" in r]
    gm = [r["offpolicy/router_gamma_mean"] for r in rows if "offpolicy/router_gamma_mean" in r]
    nan = float("nan")
    return {"gamma_mean": sum(gm) / len(gm) if gm else nan,
            "below_0.95": histogram_share_below(hist, 0.95) if hist else nan,
            "keep_all": sum(keep) / len(keep) if keep else nan}  # fmt: skip


def _live(runs: dict[str, Path]):
    """The progress bar's postfix: each arm's latest off-policy gamma (the first update of a batch is
    on-policy, where gamma is exactly 1) and reward."""

    def status() -> dict[str, str]:
        out = {}
        for arm, run in runs.items():
            rows = read_metrics(run, missing_ok=True)
            last = next((r for r in reversed(rows) if "offpolicy/router_gamma_mean" in r), None)
            if last:
                out[arm] = f"gamma_off {last['offpolicy/router_gamma_mean']:.4f} reward {last['reward/mean']:.2f}"
        return out

    return status


def run_demo(
    out_dir: str, config: str | None, overrides: list[str], eval_limit: int | None = None, overwrite: bool = False,
    progress: bool = True,
) -> int:  # fmt: skip
    """The demo into ``out_dir`` (new, empty, or with ``overwrite`` an earlier demo's output, which is
    replaced; any other directory is refused untouched). The runs are ``out_dir/grpo`` and ``out_dir/rspo``."""
    t0 = time.time()
    config = str(config or _default_config())
    cfg = load_config(TrainConfig, config, overrides)
    RunDir.check_new(out_dir, "demo", overwrite=overwrite)
    for over in ARMS.values():
        load_config(TrainConfig, config, [*overrides, *over])  # every arm's config is valid before we start
    base = load_policy(resolve_model_path(cfg.model), device=cfg.device, dtype=cfg.dtype)
    task = make_task(cfg.task.name, cfg.task.parsed)
    demo = RunDir.create(out_dir, "demo", overwrite=overwrite)
    out = demo.path
    runs = {arm: demo.claim(arm) for arm in ARMS}
    test = task.eval_examples("test")[:eval_limit]
    scorer = Scorer(task, timeout_s=cfg.scoring.timeout_s)
    print(f"base policy: {base.path}; evaluating on {len(test)} test problems")
    before = [
        evaluate(base, task, test, greedy=g, seed=cfg.seed, progress=progress, scorer=scorer) for g in (True, False)
    ]
    print(f"RL: GRPO and RSPO side by side (one process each, one thread each), {cfg.steps} steps x "
          f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} responses, {cfg.updates_per_step} "
          f"updates per rollout batch (all but the first off-policy); logs: {out}/<arm>.log")  # fmt: skip
    jobs = [
        train_job(run, config, [*overrides, *ARMS[arm], f"out_dir={run}", "threads=1"])[0] for arm, run in runs.items()
    ]
    status = run_jobs([j for j in jobs if j], parallel=len(jobs), desc="demo", progress=progress, postfix=_live(runs))
    failed = {k: v for k, v in status.items() if v.startswith("failed")}
    if failed:
        print(f"demo: a run failed: {failed}", file=sys.stderr)
        return 1
    after: dict[str, Any] = {}
    for arm, run in runs.items():
        pol = load_policy(run / "checkpoint", device=cfg.device, dtype=cfg.dtype)
        after[arm] = [evaluate(pol, task, test, greedy=g, seed=cfg.seed, progress=progress, scorer=scorer)
                      for g in (True, False)]  # fmt: skip
    scorer.close()
    write_jsonl(demo.claim("test-before.jsonl"), [r for res in before for r in res.records])
    for arm, res in after.items():
        write_jsonl(demo.claim(f"test-after-{arm}.jsonl"), [r for x in res for r in x.records])
    png = plot_runs(list(runs.values()), demo.claim("curves.png"), labels=[a.upper() for a in runs])
    drifts = {arm: drift(read_metrics(run)) for arm, run in runs.items()}
    n = len(test)

    def cell(x: float) -> str:
        return f"{x:.1%} +-{math.sqrt(x * (1 - x) / max(n, 1)):.1%}"

    print(f"\n{task.name} test split ({n} problems)   {'base':>15s}" + "".join(f"{a.upper():>17s}" for a in runs))
    for i, name in enumerate(("greedy pass@1", "sampled pass@1 (T=1)")):
        print(f"  {name:31s}{cell(before[i].accuracy):>15s}" + "".join(f"{cell(after[a][i].accuracy):>17s}"
                                                                      for a in runs))  # fmt: skip
    print("routing drift on the off-policy updates (mean over the run)")
    rows = (("gamma_mean", "gamma (mean)", "{:.4f}"), ("below_0.95", "tokens with gamma < 0.95", "{:.1%}"),
            ("keep_all", "tokens keeping all experts", "{:.1%}"))  # fmt: skip
    for key, name, fmt in rows:
        print(f"  {name:31s}{'':>15s}" + "".join(f"{fmt.format(drifts[a][key]):>17s}" for a in runs))
    collapse = {a: next((r["step"] for r in read_metrics(runs[a]) if r.get("val/collapsed")), None) for a in runs}
    print("  collapse" + " " * 38 + "".join(f"{'none' if s is None else f'step {s}':>17s}" for s in collapse.values()))
    minutes = (time.time() - t0) / 60
    print(f"\ntotal time {minutes:.1f} min\nplot: {png}\nruns: {', '.join(str(r) for r in runs.values())}")
    demo.write_json("demo_summary.json", {
        "before": {"greedy": before[0].accuracy, "sampled": before[1].accuracy},
        "after": {a: {"greedy": r[0].accuracy, "sampled": r[1].accuracy} for a, r in after.items()},
        "drift": drifts, "collapse_step": collapse, "minutes": minutes, "test_problems": n,
    })  # fmt: skip
    return 0
