"""``rspo drift``: the drift atlas. How much routing drifts, per token, as a function of the number of
experts, top-k, depth, the router's entropy, the learning rate and the number of updates per batch.

    rspo drift configs/drift-atlas.yaml                       # resumable; then the report
    rspo drift-report runs/drift --out docs/drift              # report.md and figures only

Stage 1 pretrains every model at the same budget (``pretrain`` overrides shared by all, ``models``
name -> their own overrides: preset, router aux loss). Stage 2 runs every regime (``regimes`` name ->
train overrides: learning rate, mini-batch size, i.e. updates per rollout batch) from every model,
for the same number of steps, with the same seed. Both stages are subprocess grids (``parallel`` at
a time, one torch thread each); finished runs are skipped, interrupted ones continued.

The report pools, over all off-policy updates of a run, the per-token gamma histogram the trainer
logs (``offpolicy/gamma_hist``: exact shares below 0.99 / 0.95 / 0.9, quantiles up to the bin
width), the share of tokens keeping all their experts, per-layer keep rates and shifts, and the
router entropy of each base model (mean over response tokens and layers of the entropy of the
full router softmax, also divided by log E).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rspo.config import load_config
from rspo.lab.jobs import Job, run_jobs, train_job
from rspo.lab.metrics import drift_summary, run_metrics
from rspo.routing import GAMMA_EDGES, histogram_share_below
from rspo.rundir import RunDir, steps_logged


@dataclass
class DriftConfig:
    out_dir: str = "runs/drift"
    """Atlas directory: models/<model>, runs/<model>/<regime>."""
    pretrain: list[str] = field(default_factory=list)
    """Pretraining overrides shared by every model (the equal budget: steps, batch_size, lr, seed)."""
    models: dict[str, list[str]] = field(default_factory=dict)
    """Model name -> its own pretraining overrides (preset=..., router_aux_loss_coef=...)."""
    base_config: str = "configs/demo.yaml"
    """Train config every RL run starts from."""
    common: list[str] = field(default_factory=list)
    """Train overrides shared by every RL run (steps, seed, ...)."""
    regimes: dict[str, list[str]] = field(default_factory=dict)
    """Regime name -> train overrides (optim.lr=..., mini_batch_size=... for the updates per batch)."""
    parallel: int = 2
    """Runs at once, one torch thread each."""
    entropy_problems: int = 100
    """Validation problems whose greedy responses measure each base model's router entropy."""

    def __post_init__(self) -> None:
        if not self.models or not self.regimes:
            raise ValueError("drift.models and drift.regimes must not be empty")
        bad = [n for n in [*self.models, *self.regimes] if not n.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"model and regime names must be letters, digits, - and _: {bad}")
        if self.parallel < 1 or self.entropy_problems < 1:
            raise ValueError("drift.parallel and drift.entropy_problems must be >= 1")


def model_dir(cfg: DriftConfig, name: str) -> Path:
    return Path(cfg.out_dir) / "models" / name


def run_dir(cfg: DriftConfig, model: str, regime: str) -> Path:
    return Path(cfg.out_dir) / "runs" / model / regime


def _pretrain_overrides(cfg: DriftConfig, name: str) -> list[str]:
    return [*cfg.pretrain, *cfg.models[name], f"out_dir={model_dir(cfg, name)}", "threads=1"]


def _pretrain_steps_done(d: Path) -> int:
    f = d / "progress.json"
    try:
        return int(json.loads(f.read_text())["step"]) if f.is_file() else 0
    except (json.JSONDecodeError, KeyError, ValueError):
        return 0


def run_drift(cfg: DriftConfig, progress: bool = True) -> dict[str, str]:
    """Both stages (validated first, then run); returns {directory: status}."""
    from rspo.lab.pretrain import PretrainConfig

    pre_jobs, status, pre_total = [], {}, 0
    for name in cfg.models:
        d = model_dir(cfg, name)
        pc = load_config(PretrainConfig, None, _pretrain_overrides(cfg, name))  # validated now
        pre_total += pc.steps
        if (d / "pretrain.json").is_file():
            status[str(d)] = "done (skipped)"
            continue
        cmd = [sys.executable, "-m", "rspo.cli", "pretrain", *_pretrain_overrides(cfg, name)]
        if RunDir.inspect(d) if d.is_dir() else None:
            cmd.append("--overwrite")  # an interrupted pretraining of this atlas: start it again
            (d / "progress.json").unlink(missing_ok=True)  # its steps are redone, so they are not done yet
        pre_jobs.append(Job(d, cmd, pc.steps, lambda d=d: _pretrain_steps_done(d), lambda: None))
    rl_jobs, rl_total = [], 0
    for name in cfg.models:
        for regime, over in cfg.regimes.items():
            run = run_dir(cfg, name, regime)
            job, steps = train_job(
                run,
                cfg.base_config,
                [*cfg.common, *over, f"model={model_dir(cfg, name)}", f"out_dir={run}", "threads=1"],
            )
            rl_total += steps
            if job is None:
                status[str(run)] = "done (skipped)"
            else:
                rl_jobs.append(job)
    atlas = RunDir.open_or_create(cfg.out_dir, "drift")
    atlas.write_config(cfg, "drift.yaml")
    for entry in ("models", "runs"):
        atlas.claim(entry)
    pre_done = sum(_pretrain_steps_done(model_dir(cfg, n)) for n in cfg.models)
    status |= run_jobs(
        pre_jobs, cfg.parallel, f"drift: pretraining {len(pre_jobs)} models", pre_done, pre_total, progress
    )
    if any(v.startswith("failed") for v in status.values()):
        return status
    rl_done = sum(steps_logged(run_dir(cfg, m, r)) for m in cfg.models for r in cfg.regimes)
    status |= run_jobs(rl_jobs, cfg.parallel, f"drift: {len(rl_jobs)} RL runs", rl_done, rl_total, progress)
    return status


# ----------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def router_entropy(model_path: str | Path, problems: int = 100) -> dict[str, Any]:
    """Mean entropy (nats) of the full router softmax over the response tokens of greedy responses to the
    first ``problems`` validation problems of the task the model was pretrained on, per MoE layer and overall,
    and divided by log E; with the model's shape (experts, top-k, MoE layers, expert width) and its greedy
    accuracy on those problems."""
    from rspo.evaluate import evaluate
    from rspo.policy import load_policy
    from rspo.routing import MoERouters
    from rspo.sampler import HFSampler
    from rspo.tasks import make_task

    pol = load_policy(model_path)
    pretrained_on = json.loads((Path(model_path) / "pretrain.json").read_text())["config"]["task"]
    task = make_task(pretrained_on["name"], pretrained_on["options"])  # the model's own task
    examples = task.eval_examples(task.eval_splits()[0])[:problems]  # its validation split
    gen = HFSampler(pol).sample([task.prompt(x) for x in examples], max_new_tokens=task.max_new_tokens, greedy=True)
    out = pol.model(input_ids=gen.sequences, attention_mask=gen.attention_mask, output_router_logits=True)
    routers = MoERouters(pol.model)
    e = routers.num_experts
    mask = gen.response_mask.bool()  # (B, T)
    t = mask.shape[1]
    per_layer = []
    for logits in out.router_logits:  # (B * S, E) per MoE layer
        lp = routers.family.log_probs(logits).view(gen.sequences.shape[0], -1, e)[:, -t - 1 : -1]  # (B, T, E)
        h = -(lp.exp() * lp).sum(-1)
        per_layer.append(float(h[mask].mean()))
    acc = evaluate(pol, task, examples, greedy=True).accuracy
    c = pol.model.config
    width = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    return {
        "entropy": statistics.mean(per_layer),
        "entropy_per_layer": per_layer,
        "entropy_norm": statistics.mean(per_layer) / math.log(e),
        "val_greedy": acc,
        "experts": e,
        "top_k": routers.model_top_k,
        "layers": routers.num_layers,
        "width": width,
    }


def _model_info(d: Path) -> dict[str, Any]:
    info = json.loads((d / "pretrain.json").read_text())
    return {
        "aux": info["config"].get("router_aux_loss_coef", 0.0),
        "final_loss": info["final_loss"],
        "test_greedy": info.get("test_greedy_acc"),
        "params": info["params_total"],
        "active": info["params_active"],
    }


@dataclass
class Atlas:
    """What a drift report shows: the atlas config, each base model's shape and router entropy, and each
    (model, regime) run's drift summary."""

    cfg: DriftConfig
    models: dict[str, dict[str, Any]]
    runs: dict[tuple[str, str], dict[str, Any]]


def collect(atlas_dir: str | Path) -> Atlas:
    """Every model's info (router entropy measured once per model and cached beside it) and every run's drift."""
    atlas_dir = Path(atlas_dir)
    if not (atlas_dir / "drift.yaml").is_file():
        raise FileNotFoundError(f"{atlas_dir} has no drift.yaml: not a drift-atlas directory")
    cfg = load_config(DriftConfig, atlas_dir / "drift.yaml")
    cfg.out_dir = str(atlas_dir)
    models, runs = {}, {}
    for name in cfg.models:
        d = model_dir(cfg, name)
        if not (d / "pretrain.json").is_file():
            continue
        cache = atlas_dir / "models" / f"{name}.entropy.json"  # measured once per model
        if not cache.is_file():
            entropy = json.dumps(router_entropy(d, cfg.entropy_problems))
            RunDir.existing(atlas_dir, "drift").write_under("models", cache.name, entropy)
        models[name] = {**_model_info(d), **json.loads(cache.read_text())}
        for regime in cfg.regimes:
            rows = run_metrics(run_dir(cfg, name, regime), missing_ok=True)
            if rows:
                runs[(name, regime)] = drift_summary(rows)
    return Atlas(cfg, models, runs)


DRIFT_FIGURES = ("gamma_cdf.png", "tail.png", "per_layer.png", "entropy.png")


def figures(atlas: Atlas, o: Path) -> None:
    """gamma_cdf.png, tail.png, per_layer.png and entropy.png into ``o``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, models, runs = atlas.cfg, atlas.models, atlas.runs
    regimes = list(cfg.regimes)
    colors = plt.get_cmap("tab10").colors
    # gamma CDFs, one panel per regime
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 4), squeeze=False)
    for ax, regime in zip(axes[0], regimes, strict=True):
        for i, name in enumerate(models):
            r = runs.get((name, regime))
            if not r or not r["tokens"]:
                continue
            xs = sorted(GAMMA_EDGES[1:-1])
            ys = [histogram_share_below(r["hist"], x) for x in xs]
            ax.plot([1 - x for x in xs], ys, marker=".", label=name, color=colors[i % 10])
        ax.axvline(0.05, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"{regime}: share of off-policy tokens with gamma < 1 - x", fontsize=9)
        ax.set_xlabel("1 - gamma (0.05: gamma = 0.95)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(o / "gamma_cdf.png", dpi=100)
    plt.close(fig)
    # tail share and keep-all per model, bars per regime
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    width = 0.8 / max(1, len(regimes))
    for j, regime in enumerate(regimes):
        xs = [i + j * width for i in range(len(models))]
        axes[0].bar(xs, [runs.get((m, regime), {}).get("below_0.95", 0) for m in models], width, label=regime)
        axes[1].bar(xs, [runs.get((m, regime), {}).get("keep_all", 0) for m in models], width, label=regime)
    for ax, title in zip(
        axes, ("share of off-policy tokens with gamma < 0.95", "share keeping all their experts"), strict=True
    ):
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(models))], list(models), rotation=30, ha="right", fontsize=8
        )
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[1].axhline(0.8, color="grey", ls=":", lw=1)
    axes[0].axhline(0.1, color="grey", ls=":", lw=1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(o / "tail.png", dpi=100)
    plt.close(fig)
    # per-layer keep and shift at the last regime
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, name in enumerate(models):
        r = runs.get((name, regimes[-1]))
        if r and r["keep_layer"]:
            axes[0].plot(range(len(r["keep_layer"])), r["keep_layer"], marker="o", label=name, color=colors[i % 10])
            axes[1].plot(range(len(r["shift_layer"])), r["shift_layer"], marker="o", label=name, color=colors[i % 10])
    axes[0].set_title(f"{regimes[-1]}: share keeping their experts, per layer", fontsize=10)
    axes[1].set_title(f"{regimes[-1]}: mean |log r_new - log r_old| of the old experts, per layer", fontsize=10)
    for ax in axes:
        ax.set_xlabel("MoE layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(o / "per_layer.png", dpi=100)
    plt.close(fig)
    # drift against the router's normalised entropy
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for j, regime in enumerate(regimes):
        pts = [(models[m]["entropy_norm"], runs[(m, regime)]["below_0.95"]) for m in models if (m, regime) in runs]
        if pts:
            ax.scatter(*zip(*pts, strict=True), label=regime, color=colors[j % 10])
    for m in models:
        if (m, regimes[-1]) in runs:
            ax.annotate(m, (models[m]["entropy_norm"], runs[(m, regimes[-1])]["below_0.95"]), fontsize=7)
    ax.set_xlabel("router entropy / log E (base policy, response tokens)")
    ax.set_ylabel("share of off-policy tokens with gamma < 0.95")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(o / "entropy.png", dpi=100)
    plt.close(fig)


def markdown(atlas: Atlas, generated_by: str) -> str:
    """report.md: settings, the models table and the drift table, and the figures' links."""
    cfg, models, runs = atlas.cfg, atlas.models, atlas.runs

    def pct(x: float) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"

    lines = [
        "# Drift atlas",
        "",
        generated_by,
        f"Pretraining (every model, the same budget): `{' '.join(cfg.pretrain) or '-'}`. RL: base config "
        f"`{cfg.base_config}`, common overrides `{' '.join(cfg.common) or '-'}`.",
        "",
        "Off-policy tokens: the response tokens of every update after the first of each rollout batch (the first is "
        "on-policy, gamma exactly 1). Shares and quantiles come from the per-token gamma histogram pooled over all "
        "of a run's off-policy updates (exact shares below 0.99 / 0.95 / 0.9; quantiles interpolated within bins). "
        "Keep-all: share of those tokens whose top-K expert set is unchanged in every MoE layer. Router entropy: "
        f"of the full softmax, base policy, response tokens of greedy answers to {cfg.entropy_problems} validation "
        "problems, mean over layers; / log E in brackets.",
        "",
        "## Models",
        "",
        "| model | overrides | experts | top-k | layers | expert width | aux loss | params (active) | final loss | "
        "test greedy | router entropy |",
        "|" + "---|" * 11,
    ]
    for name, m in models.items():
        lines.append(
            f"| {name} | `{' '.join(cfg.models[name])}` | {m['experts']} | {m['top_k']} | {m['layers']} | {m['width']} "
            f"| {m['aux']:g} | {m['params']:,} ({m['active']:,}) | {m['final_loss']:.3f} | {pct(m['test_greedy'])} | "
            f"{m['entropy']:.2f} ({m['entropy_norm']:.2f}) |"
        )
    lines += [
        "",
        "## Drift on off-policy updates",
        "",
        "| model | regime | overrides | gamma mean | p1 | p10 | median | < 0.99 | < 0.95 | < 0.9 | keep all | "
        "keep per layer (min..max) | ratio std |",
        "|" + "---|" * 13,
    ]
    for (name, regime), r in runs.items():
        kl = r["keep_layer"]
        lines.append(
            f"| {name} | {regime} | `{' '.join(cfg.regimes[regime])}` | {r['gamma_mean']:.4f} | {r['p1']:.3f} | "
            f"{r['p10']:.4f} | {r['p50']:.5f} | {pct(r['below_0.99'])} | **{pct(r['below_0.95'])}** | "
            f"{pct(r['below_0.9'])} | **{pct(r['keep_all'])}** | "
            f"{(pct(min(kl)) + '..' + pct(max(kl))) if kl else 'n/a'} | {r['ratio_std']:.4f} |"
        )
    lines += [
        "",
        "![gamma CDFs](gamma_cdf.png)",
        "",
        "![tail and keep-all](tail.png)",
        "",
        "![per layer](per_layer.png)",
        "",
        "![entropy](entropy.png)",
        "",
    ]
    return "\n".join(lines)


def write_drift_report(
    atlas_dir: str | Path, out: str | Path | None = None, overwrite: bool = False, command: str | None = None
) -> Path:
    """report.md, results.json and figures of an atlas into ``out`` (default: the atlas directory)."""
    atlas = collect(atlas_dir)
    if out is None:
        dest = RunDir.existing(atlas_dir, "drift")
    else:
        dest = RunDir.create(out, "drift-report", overwrite=overwrite)
    for f in ("report.md", "results.json", *DRIFT_FIGURES):
        dest.claim(f)
    figures(atlas, dest.path)
    generated_by = (
        f"Generated by `rspo drift-report {atlas_dir}{'' if out is None else f' --out {out}'}` from the "
        f"runs of `{command or 'rspo drift <config>'}`."
    )
    report = dest.write_text("report.md", markdown(atlas, generated_by))
    results = {"models": atlas.models, "runs": {f"{m}/{r}": v for (m, r), v in atlas.runs.items()}}
    dest.write_text("results.json", json.dumps(results, indent=1))
    return report
