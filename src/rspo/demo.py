"""``rspo demo``: RSPO on Countdown from the shipped base policy, with a before/after table and plots."""

from __future__ import annotations

import math
import time
from pathlib import Path

from rspo.config import load_config
from rspo.evaluate import evaluate, write_jsonl
from rspo.plots import plot_runs
from rspo.policy import load_policy, resolve_model_path
from rspo.rundir import RunDir
from rspo.scoring import Scorer
from rspo.tasks import make_task
from rspo.train_config import TrainConfig
from rspo.trainer import Trainer


def _default_config() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / "configs" / "demo.yaml").is_file():
            return base / "configs" / "demo.yaml"
    raise FileNotFoundError("configs/demo.yaml not found (run from the repository root or pass --config)")


def run_demo(
    out_dir: str, config: str | None, overrides: list[str], eval_limit: int | None = None, overwrite: bool = False
) -> int:
    """The demo into ``out_dir`` (new, empty, or with ``overwrite`` an earlier demo's output, which is
    replaced; any other directory is refused untouched). The RL run is ``out_dir/<objective>``."""
    t0 = time.time()
    cfg = load_config(TrainConfig, config or _default_config(), overrides)
    RunDir.check_new(out_dir, "demo", overwrite=overwrite)
    base = load_policy(resolve_model_path(cfg.model), device=cfg.device, dtype=cfg.dtype)
    task = make_task(cfg.task.name, cfg.task.parsed)
    demo = RunDir.create(out_dir, "demo", overwrite=overwrite)
    out = demo.path
    cfg.out_dir = str(demo.claim(cfg.objective.name))
    test = task.eval_examples("test")[:eval_limit]
    print(f"base policy: {base.path}; evaluating on {len(test)} test problems")
    scorer = Scorer(task, timeout_s=cfg.scoring.timeout_s)
    before = [evaluate(base, task, test, greedy=g, seed=cfg.seed, progress=True, scorer=scorer) for g in (True, False)]
    print(
        f"RL: {cfg.objective.name}, {cfg.steps} steps x {cfg.rollout.prompts_per_step} prompts x "
        f"{cfg.rollout.group_size} responses, {cfg.updates_per_step} updates per step"
    )
    trainer = Trainer(cfg)
    summary = trainer.train()
    after = [evaluate(trainer.policy, task, test, greedy=g, seed=cfg.seed, progress=True, scorer=scorer)
             for g in (True, False)]  # fmt: skip
    scorer.close()
    write_jsonl(demo.claim("test-before.jsonl"), [r for res in before for r in res.records])
    write_jsonl(demo.claim("test-after.jsonl"), [r for res in after for r in res.records])
    png = plot_runs([cfg.out_dir], demo.claim("curves.png"), labels=[f"{cfg.objective.name} (demo)"])
    rows = [("greedy accuracy", before[0].accuracy, after[0].accuracy),
            ("sampled accuracy (T=1)", before[1].accuracy, after[1].accuracy),
            ("mean reward (greedy)", before[0].mean_reward, after[0].mean_reward)]  # fmt: skip
    n = len(test)
    print(f"\nCountdown test split ({n} problems)   before      after   (+- one standard error)")
    for name, a, b in rows:
        if "reward" in name:
            print(f"  {name:32s}{a:>10.3f} {b:>10.3f}")
        else:
            se_a, se_b = (math.sqrt(x * (1 - x) / max(n, 1)) for x in (a, b))
            print(f"  {name:32s}{a:>10.1%} {b:>10.1%}   (+-{se_a:.1%} / +-{se_b:.1%})")
    collapse = "none" if summary["collapse_step"] is None else f"at step {summary['collapse_step']}"
    print(f"\ncollapse: {collapse}; total time {(time.time() - t0) / 60:.1f} min")
    print(f"plots: {png}\nmetrics: {Path(cfg.out_dir) / 'metrics.jsonl'}\n"
          f"responses: {out}/test-before.jsonl, test-after.jsonl")  # fmt: skip
    demo.write_json("demo_summary.json", {"before": {r[0]: r[1] for r in rows}, "after": {r[0]: r[2] for r in rows},
                                          "summary": summary, "minutes": (time.time() - t0) / 60})  # fmt: skip
    return 0
