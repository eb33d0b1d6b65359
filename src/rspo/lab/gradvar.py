"""``rspo gradvar``: the variance of the policy gradient over resampled mini-batches, at fixed parameters.

The paper says RSPO lowers the variance of the gradient of off-policy updates; this measures it
directly, paired across objectives (the same rollout batch, the same parameters, the same mini-batches):

1. From the policy theta_0, sample a rollout batch, score it, and run the old pass (old log-probs and
   the old router trace), as the trainer does.
2. Take ``warm_updates`` optimizer steps (``warm_objective``, the run's learning rate) on the first
   mini-batches, to theta_1: the rest of the batch is now off-policy, as in the second update of a step.
3. At theta_1, fixed, draw ``draws`` mini-batches of size ``mini_batch_size`` uniformly without
   replacement from the rollout batch; for every objective, the gradient g_i of its loss on each.
4. Per objective: the total variance ``sum_p Var_i(g_ip)`` (unbiased, over draws), the relative variance
   ``variance / ||mean_i g_i||^2`` (scale-free: the objectives' losses differ in scale), and the mean
   cosine between a draw's gradient and their mean.

Repeated over ``seeds`` rollout batches; reported as mean and standard deviation over seeds, and the
paired ratio RSPO / GMPO per seed (the two differ only by gamma).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rspo.config import load_config
from rspo.lab.stats import mean_std
from rspo.objectives import get_objective
from rspo.options import LOSS_ONLY, ObjectiveOptions, Options, RouterShiftOptions
from rspo.train_config import TrainConfig


@dataclass
class GradVarConfig:
    train_config: str = "configs/demo.yaml"
    """The run's config: model, task, rollout, learning rate, mini-batch size, router-shift options."""
    overrides: list[str] = field(default_factory=list)
    """Overrides of the train config (e.g. model=runs/x/checkpoint, optim.lr=3e-4)."""
    objectives: list[str] = field(default_factory=lambda: ["grpo", "gmpo", "rspo"])
    """Objectives whose gradients are compared (rspo with the config's router-shift options)."""
    warm_objective: str = "gmpo"
    """Objective of the warm-up steps that make the batch off-policy (the same theta_1 for every objective)."""
    warm_updates: int = 1
    """Optimizer steps before the measurement."""
    draws: int = 32
    """Mini-batches drawn per rollout batch."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """One rollout batch per seed."""
    out_dir: str = "runs/gradvar"
    """results.json and report.md."""

    def __post_init__(self) -> None:
        if self.draws < 2 or self.warm_updates < 0 or not self.seeds or not self.objectives:
            raise ValueError("gradvar: draws >= 2, warm_updates >= 0, non-empty seeds and objectives required")


def measure(cfg: GradVarConfig, progress: bool = True) -> dict[str, Any]:
    """Run the protocol of the module docstring; returns per-seed and aggregated results."""
    from tqdm.auto import tqdm

    from rspo.rundir import RunDir
    from rspo.trainer import Trainer

    run = RunDir.open_or_create(cfg.out_dir, "gradvar")
    per_seed: dict[str, list[dict[str, float]]] = {o: [] for o in cfg.objectives}
    bar = tqdm(total=len(cfg.seeds) * cfg.draws * len(cfg.objectives), desc="gradvar", disable=not progress)
    for seed in cfg.seeds:
        tcfg = load_config(
            TrainConfig,
            cfg.train_config,
            [*cfg.overrides, f"seed={seed}", "eval_every=0", f"out_dir={run.claim(f'seed{seed}')}"],
        )
        tr = Trainer(tcfg, progress=False, overwrite=True)
        try:
            b = tr.rollout()
            tr.score_and_advantages(b)
            tr.old_pass(b)
            mb_size, n = tcfg.mini_batch_size, len(b.texts)
            warm = _options(tcfg, cfg.warm_objective)
            for i in range(cfg.warm_updates):  # theta_0 -> theta_1 on the first mini-batches of the batch order
                loss, _ = tr.policy_loss(b, b.order[i * mb_size : (i + 1) * mb_size], warm)
                tr.backward(loss)
                tr.optimizer_step()
            g = torch.Generator().manual_seed(10_000 + seed)
            draws = [torch.randperm(n, generator=g)[:mb_size].to(tr.device) for _ in range(cfg.draws)]
            for name in cfg.objectives:
                opts = _options(tcfg, name)
                total = sq = None
                for rows in draws:
                    loss, _ = tr.policy_loss(b, rows, opts)
                    tr.backward(loss)
                    v = tr.flat_grad().double()
                    total, sq = (v, v * v) if total is None else (total + v, sq + v * v)
                    bar.update()
                k = len(draws)
                mean = total / k
                var = float(((sq - k * mean * mean) / (k - 1)).sum())
                norm2 = float((mean * mean).sum())
                per_seed[name].append(
                    {
                        "variance": var,
                        "relative_variance": var / norm2 if norm2 else math.nan,
                        "mean_grad_norm": math.sqrt(norm2),
                    }
                )
            tr.opt.zero_grad(set_to_none=True)
        finally:
            tr.scorer.close()
            tr.run.close()
    bar.close()
    summary = {}
    for name, rows in per_seed.items():
        summary[name] = {k: mean_std(r[k] for r in rows) for k in rows[0]}  # NaN (a zero mean gradient): left out
    if "rspo" in per_seed and "gmpo" in per_seed:
        ratios = [a["variance"] / b["variance"] for a, b in zip(per_seed["rspo"], per_seed["gmpo"], strict=True)]
        summary["rspo_over_gmpo_variance"] = {"per_seed": ratios, "mean": statistics.mean(ratios)}
    return {"per_seed": per_seed, "summary": summary}


def _options(cfg: TrainConfig, name: str) -> Options:
    """The run's options with objective ``name`` (its default hyperparameters) and router shift as it uses it
    (on for rspo only; the run's loss-only router-shift options then do not apply)."""
    rs = dataclasses.replace(cfg.router_shift, enabled=None)
    if get_objective(name).router_shift != "required":
        rs = dataclasses.replace(rs, **{k: getattr(RouterShiftOptions(), k) for k in LOSS_ONLY})
    return Options(ObjectiveOptions(name), rs, cfg.routing.control)


def write_gradvar(cfg: GradVarConfig, result: dict[str, Any]) -> Path:
    from rspo.rundir import RunDir

    run = RunDir.open_or_create(cfg.out_dir, "gradvar")
    run.write_json("results.json", result)
    s = result["summary"]
    lines = [
        "# Policy-gradient variance over resampled mini-batches, at fixed parameters",
        "",
        f"Train config `{cfg.train_config}` with `{' '.join(cfg.overrides) or '-'}`; {len(cfg.seeds)} rollout "
        f"batches (seeds {cfg.seeds}), {cfg.warm_updates} warm-up step(s) with {cfg.warm_objective}, "
        f"{cfg.draws} mini-batches drawn per batch. Mean +- std over seeds.",
        "",
        "| objective | total variance | relative variance (/ squared norm of the mean gradient) | "
        "norm of the mean gradient |",
        "|---|---|---|---|",
    ]
    for name in cfg.objectives:
        v = s[name]
        lines.append(
            f"| {name} | {v['variance'][0]:.4g} +- {v['variance'][1]:.2g} | "
            f"{v['relative_variance'][0]:.4g} +- {v['relative_variance'][1]:.2g} | "
            f"{v['mean_grad_norm'][0]:.4g} +- {v['mean_grad_norm'][1]:.2g} |"
        )
    if "rspo_over_gmpo_variance" in s:
        r = s["rspo_over_gmpo_variance"]
        lines += [
            "",
            f"RSPO / GMPO total variance, paired per seed: "
            f"{', '.join(f'{x:.4f}' for x in r['per_seed'])} (mean {r['mean']:.4f}).",
        ]
    run.write_text("report.md", "\n".join(lines) + "\n")
    return run.path / "report.md"


def load_gradvar(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "results.json").read_text())
