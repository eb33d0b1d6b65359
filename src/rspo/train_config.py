"""Typed configuration of ``rspo train`` (YAML presets in ``configs/``, dotted overrides on the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from rspo.correction import Mode as CorrectionMode
from rspo.correction import RolloutCorrection
from rspo.objectives import (
    LossAgg,
    RouterShiftForm,
    RouterShiftPlacement,
    WeightsReduce,
    check_hparams,
    get_objective,
    list_objectives,
)
from rspo.policy import Device, DType
from rspo.routing.families import RouterProb
from rspo.routing.shift import ExpertAgg, LayerAgg
from rspo.routing.step import RoutingControl, RoutingOptions
from rspo.tasks import task_options


def resolve_router_shift(objective: str, enabled: bool | None) -> bool:
    """Whether ``objective`` uses router shift: ``None`` means on for rspo (which needs it), off otherwise."""
    use = get_objective(objective).router_shift
    if enabled is None:
        return use == "required"
    if use == "required" and not enabled:
        raise ValueError(f"objective {objective!r} needs router shift (use gmpo without it)")
    if use == "none" and enabled:
        raise ValueError(f"objective {objective!r} cannot use router shift (use rspo for gmpo + RS)")
    return enabled


def objective_hparams(
    objective: str,
    *,
    clip_low: float | None,
    clip_high: float | None,
    loss_agg: str | None,
    norm_length: float,
    dual_clip: float | None = None,
    router_shift: bool,
    placement: str,
    stop_gradient: bool,
    form: str,
    clip_threshold: float | None = None,
    clip_drop: bool = False,
) -> dict:
    """Keyword hyperparameters for rspo.objectives.compute_policy_loss from config values (None = the
    objective's default); ``norm_length`` is used only with loss_agg='seq-mean-token-sum-norm'."""
    hp: dict = {
        k: v
        for k, v in (("clip_low", clip_low), ("clip_high", clip_high), ("loss_agg", loss_agg), ("dual_clip", dual_clip))
        if v is not None
    }
    if loss_agg == "seq-mean-token-sum-norm":
        hp["norm_length"] = float(norm_length)
    if router_shift:
        hp.update(
            router_shift_placement=placement,
            router_shift_grad=not stop_gradient,
            router_clip_threshold=clip_threshold,
            router_clip_drop=clip_drop,
        )
        if objective == "rspo":
            hp["router_shift_form"] = form
    return hp  # fmt: skip


@dataclass
class ObjectiveConfig:
    name: str = "rspo"
    """Registered objective: grpo | gspo | gspo_token | gmpo | rspo."""
    clip_low: float | None = None
    """Lower clip (ratio space for grpo/gspo, log space for gmpo/rspo); None = the objective's default."""
    clip_high: float | None = None
    """Upper clip; None = the objective's default (DAPO clip-higher: grpo with 0.28)."""
    loss_agg: LossAgg | None = None
    """Token aggregation for grpo / gspo_token; None = default (seq-mean-token-mean). Error for others."""
    norm_length: float | None = None
    """Dr. GRPO's constant normaliser (with loss_agg=seq-mean-token-sum-norm); None = the response length limit."""
    dual_clip: float | None = None
    """Dual-clip PPO bound c > 1 + clip_high for negative advantages (verl clip_ratio_c, TRL delta); grpo, gspo
    and gspo_token only; None = off."""

    def __post_init__(self) -> None:
        if self.name not in list_objectives():
            raise ValueError(f"objective.name={self.name!r}; valid: {', '.join(list_objectives())}")
        if self.norm_length is not None and not self.norm_length > 0:
            raise ValueError(f"objective.norm_length must be > 0 (or null for the response length limit), "
                             f"got {self.norm_length}")  # fmt: skip
        has_agg = "loss_agg" in get_objective(self.name).defaults
        if not has_agg and (self.loss_agg is not None or self.norm_length is not None):
            raise ValueError(f"objective.loss_agg / norm_length do not apply to {self.name!r}")


@dataclass
class RouterShiftConfig:
    enabled: bool | None = None
    """Weight tokens by gamma; None = on for rspo (required there), off otherwise (GRPO+RS / GSPO+RS: true)."""
    expert_agg: ExpertAgg = "log_mean"
    """Aggregation over the K old experts: paper Eq. 6 (log_mean) or the paper's snippet (mean_exp)."""
    layer_agg: LayerAgg = "geo_mean"
    """Aggregation over MoE layers: Eq. 6's geometric mean, or a product."""
    gamma_min: float = 0.5
    """Floor of gamma."""
    placement: RouterShiftPlacement = "after_clip"
    """Where gamma enters: after token clipping (paper text, snippet) or before (ACL abstract)."""
    form: RouterShiftForm = "weight"
    """rspo only: multiply by gamma for both advantage signs, or Eq. 5 read literally (gamma^sgn(A))."""
    stop_gradient: bool = True
    """False is the paper's collapsing ablation: gradients flow through gamma into the router."""
    top_k: int | None = None
    """K old experts per layer; None = the model's experts-per-token."""
    prob: RouterProb = "full"
    """Router probability: full softmax (sigmoid score) or renormalised over the old top-K."""
    clip_threshold: float | None = None
    """Report the share of tokens with gamma below this (the snippet's router_clip_mask)."""
    clip_drop: bool = False
    """Also drop tokens with gamma < clip_threshold from the loss."""

    def __post_init__(self) -> None:
        if not 0 < self.gamma_min <= 1:
            raise ValueError(f"router_shift.gamma_min must be in (0, 1], got {self.gamma_min}")
        if self.clip_threshold is not None and not 0 < self.clip_threshold <= 1:
            raise ValueError(f"router_shift.clip_threshold must be in (0, 1], got {self.clip_threshold}")
        if self.clip_drop and self.clip_threshold is None:
            raise ValueError("router_shift.clip_drop needs router_shift.clip_threshold")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"router_shift.top_k must be >= 1 (and <= the model's experts), got {self.top_k}")


@dataclass
class RoutingConfig:
    control: RoutingControl = "none"
    """Routing-control baseline: router freezing, routing replay (copy old logits / reuse old indices)."""
    aux_loss_coef: float = 0.0
    """Router load-balancing auxiliary loss coefficient (transformers' aux_loss); 0 = off."""

    def __post_init__(self) -> None:
        if self.aux_loss_coef < 0:
            raise ValueError(f"routing.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16
    """Prompts per rollout batch."""
    group_size: int = 8
    """Responses per prompt (G); rollout batch = prompts_per_step * group_size."""
    max_new_tokens: int | None = None
    """Response length limit; None = the task's (task.options.max_new_tokens)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1 or self.group_size < 2:
            raise ValueError("rollout.prompts_per_step >= 1 and group_size >= 2 required")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:  # 0 is not "the task's": null is
            raise ValueError(f"rollout.max_new_tokens must be >= 1 (or null for the task's), got {self.max_new_tokens}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError("rollout.temperature must be > 0 and top_p in (0, 1]")


@dataclass
class RolloutCorrectionConfig:
    level: Literal["none", "token", "sequence", "geometric"] = "none"
    """Rollout-correction weights from the sampler's log-probs (rspo.correction): none | token | sequence |
    geometric (length-normalised sequence ratio). Mismatch metrics (rollout/...) are logged either way."""
    mode: CorrectionMode = "truncate"
    """truncate (TIS: clamp the ratio into [low, high]) or mask (IcePop / MIS: weight 0 outside it)."""
    low: float | None = None
    """Lower bound of the ratio pi_old / pi_rollout; None = open."""
    high: float | None = 2.0
    """Upper bound; None = open."""
    reduce: WeightsReduce | None = None
    """level=token with a sequence objective (gspo, gmpo, rspo): reduce a sequence's token weights
    geometrically (default) or arithmetically; an error elsewhere."""

    def __post_init__(self) -> None:
        if self.level == "none":
            changed = [f.name for f in fields(self) if f.name != "level" and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(f"{', '.join(changed)} set but level is none (no correction); set a level")
            return
        self.build()  # RolloutCorrection's own checks (bounds, order)

    def build(self) -> RolloutCorrection | None:
        """The correction, or None for level none."""
        if self.level == "none":
            return None
        return RolloutCorrection(level=self.level, mode=self.mode, low=self.low, high=self.high)  # type: ignore[arg-type]


@dataclass
class TaskConfig:
    name: str = "countdown"
    """Task: countdown | math | arithmetic, or an import path pkg.module:TaskClass (a rspo.tasks.Task)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The task's options, e.g. {train: [data.parquet], eval: {aime24: aime24.jsonl}} for math; an unknown
    option is an error listing the valid ones (`rspo tasks` lists every task's options)."""

    def __post_init__(self) -> None:
        self.parsed = task_options(self.name, self.options)  # validated now; the task is built by the trainer

    @property
    def max_new_tokens(self) -> int:
        return int(getattr(self.parsed, "max_new_tokens", 512))


@dataclass
class ScoringConfig:
    timeout_s: float | None = 10.0
    """Seconds one reward call may take: calls run in a scoring worker process that is killed after this
    (reward 0, counted in reward/timeouts); null = call in-process without a time bound."""
    workers: int = 1
    """Scoring worker processes (responses interleaved); more helps slow verifiers."""
    max_rss_mb: float | None = 1024.0
    """A worker whose resident memory is above this (MiB) after a call is replaced by a fresh one (no verdict
    lost; counted in reward/worker_recycles); its address space is capped at twice this; null = no limit."""

    def __post_init__(self) -> None:
        from rspo.scoring import MIN_RSS_MB

        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"scoring.timeout_s must be > 0 (or null), got {self.timeout_s}")
        if self.workers < 1:
            raise ValueError(f"scoring.workers must be >= 1, got {self.workers}")
        if self.max_rss_mb is not None and self.max_rss_mb < MIN_RSS_MB:
            raise ValueError(f"scoring.max_rss_mb must be >= {MIN_RSS_MB:g} (or null), got {self.max_rss_mb}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """AdamW learning rate (constant after warmup)."""
    warmup_steps: int = 0
    """Linear warmup, in optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max gradient norm (0 = no clipping)."""

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.grad_clip < 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(
                f"optim.lr > 0, grad_clip >= 0, warmup_steps >= 0, weight_decay >= 0 required; got lr={self.lr}, "
                f"grad_clip={self.grad_clip}, warmup_steps={self.warmup_steps}, weight_decay={self.weight_decay}"
            )


@dataclass
class TrainConfig:
    model: str = "base"
    """Policy: a checkpoint directory, a hub id (from the local cache), or 'base' (the shipped Countdown policy)."""
    device: Device = "auto"
    """Where the policy and every tensor of the loop live: auto (cuda if available), cpu or cuda."""
    dtype: DType = "float32"
    """Parameter dtype: float32, or bfloat16 (GPU; on this CPU 6x slower than float32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward (less memory, about a third more compute)."""
    out_dir: str = "runs/train"
    """Run directory: config.yaml, metrics.jsonl, checkpoints, plots."""
    seed: int = 0
    """Seed of data order, sampling and mini-batch shuffling."""
    steps: int = 100
    """Rollout steps (each: one rollout batch, then its mini-batch updates)."""
    mini_batch_size: int = 64
    """Responses per optimizer step; rollout batch / mini_batch_size updates per step (the paper: 128/64)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    advantage: Literal["grpo", "dr_grpo"] = "grpo"
    """Group-relative advantage: (r - mean) / std (grpo) or r - mean (Dr. GRPO)."""
    drop_zero_spread: bool = False
    """Leave groups whose rewards are all equal out of the loss (they carry no signal)."""
    kl_coef: float = 0.0
    """KL penalty to the initial (reference) policy, k3 estimator per token; 0 = off."""
    eval_every: int = 10
    """Steps between greedy validation-accuracy checks (0 = never, the only period where 0 means off)."""
    eval_problems: int = 200
    """Validation examples per check (the first ones of the split)."""
    eval_split: str | None = None
    """Validation split of the task; None = its first (countdown: validation)."""
    eval_samples: int = 0
    """Also log ``val/accuracy_sampled``: pass@1 of this many responses per validation problem sampled at
    the rollout temperature (fixed seeds, so checks are comparable); 0 = greedy accuracy only."""
    checkpoint_every: int = 10
    """Steps between checkpoints, >= 1 (the last step always writes one)."""
    collapse_drop: float = 0.5
    """Collapse: validation accuracy below (1 - collapse_drop) x its running best (with best >= 0.05)."""
    max_bad_steps: int = 3
    """Consecutive non-finite losses after which the run stops (the last good checkpoint stays)."""
    threads: int = 2
    """torch CPU threads."""
    log_router: bool | None = None
    """Capture router data for diagnostics (gamma, non-shifted ratio, load) even when the objective and the
    routing control do not need it; None = on for MoE models, off for dense ones; false skips capture
    (e.g. to time plain GRPO); true on a dense model is an error."""
    log_grad_variance: bool = False
    """Log grad/minibatch_var: the variance across a step's mini-batches of the (unclipped) policy gradient,
    summed over parameters, and grad/minibatch_cos between consecutive mini-batch gradients (the
    variance the paper says RSPO reduces). Costs one flattened gradient copy per update."""
    task: TaskConfig = field(default_factory=TaskConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    router_shift: RouterShiftConfig = field(default_factory=RouterShiftConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        batch = self.rollout.prompts_per_step * self.rollout.group_size
        if self.mini_batch_size < 1 or batch % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size={self.mini_batch_size} must divide the rollout batch "
                f"(rollout.prompts_per_step x rollout.group_size = {batch})"
            )
        if self.steps < 1 or self.ppo_epochs < 1 or self.threads < 1:
            raise ValueError("steps, ppo_epochs and threads must be >= 1")
        if self.eval_samples < 0 or self.eval_problems < 1:
            raise ValueError(f"eval_samples must be >= 0 and eval_problems >= 1, got {self.eval_samples}, "
                             f"{self.eval_problems}")  # fmt: skip
        if not 0 < self.collapse_drop < 1:
            raise ValueError(f"collapse_drop must be in (0, 1), got {self.collapse_drop}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 (a period in steps), got {self.checkpoint_every}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 1, or 0 for no validation, got {self.eval_every}")
        if self.kl_coef < 0 or self.max_bad_steps < 1:
            raise ValueError(f"kl_coef >= 0 and max_bad_steps >= 1 required, got {self.kl_coef}, {self.max_bad_steps}")
        self.router_shift.enabled = resolve_router_shift(self.objective.name, self.router_shift.enabled)
        if self.router_shift.form != "weight" and self.objective.name != "rspo":
            raise ValueError("router_shift.form applies to the rspo objective only")
        try:  # the objective's own checks (clip ranges, aggregation), now rather than at the first update
            check_hparams(self.objective.name, router_shift=bool(self.router_shift.enabled), **self.objective_hparams())
        except ValueError as e:
            raise ValueError(f"objective: {e}") from None
        rc = self.rollout_correction
        sequence_objective = get_objective(self.objective.name).level == "sequence"
        if rc.reduce is not None and not (rc.level == "token" and sequence_objective):
            raise ValueError(f"rollout_correction.reduce applies to level=token with a sequence objective (gspo, gmpo, "
                             f"rspo), not to level={rc.level} with {self.objective.name}")  # fmt: skip

    @property
    def max_new_tokens(self) -> int:
        """The response length limit: rollout.max_new_tokens, or the task's."""
        return self.task.max_new_tokens if self.rollout.max_new_tokens is None else self.rollout.max_new_tokens

    def routing_options(self) -> RoutingOptions:
        rs = self.router_shift
        return RoutingOptions(shift=bool(rs.enabled), expert_agg=rs.expert_agg, layer_agg=rs.layer_agg,
                              gamma_min=rs.gamma_min, stop_gradient=rs.stop_gradient, top_k=rs.top_k, prob=rs.prob,
                              control=self.routing.control, log=self.log_router)  # fmt: skip

    @property
    def updates_per_step(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.group_size // self.mini_batch_size * self.ppo_epochs

    def objective_hparams(self) -> dict:
        """The keyword hyperparameters passed to rspo.objectives.compute_policy_loss."""
        o, rs = self.objective, self.router_shift
        return objective_hparams(
            o.name, clip_low=o.clip_low, clip_high=o.clip_high, loss_agg=o.loss_agg, dual_clip=o.dual_clip,
            norm_length=self.max_new_tokens if o.norm_length is None else o.norm_length, router_shift=rs.enabled,
            placement=rs.placement, stop_gradient=rs.stop_gradient, form=rs.form,
            clip_threshold=rs.clip_threshold, clip_drop=rs.clip_drop,
        )  # fmt: skip
