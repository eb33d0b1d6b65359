"""Typed configuration of ``rspo train`` (YAML presets in ``configs/``, dotted overrides on the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from rspo.correction import Mode as CorrectionMode
from rspo.correction import RolloutCorrection
from rspo.objectives import WeightsReduce, get_objective
from rspo.options import ObjectiveOptions, Options, RouterShiftOptions
from rspo.policy import Device, DType
from rspo.routing.step import RoutingControl, RoutingOptions
from rspo.scoring import ScoringConfig
from rspo.tasks import TaskConfig


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
    dtype: DType | None = None
    """Precision of the rollout's copy of the policy (bfloat16 rollouts with a float32 trainer, the usual GPU
    set-up, make the train/inference mismatch real on a CPU); None = the policy's own, no copy."""
    record_routing: bool | None = None
    """Record each token's experts during generation (vLLM's routed_experts layout); None = on with routing
    control replay_rollout (R3, which needs it) or a rollout dtype of its own."""
    routing_diagnostics: bool = True
    """With recorded routing: every step, the agreement of the trainer's own top-K with the rollout's
    (rollout/routing_*) and the log-prob mismatch both under the trainer's own routing (rollout/own/*) and
    under the rollout's (rollout/replayed/*); one extra no-grad forward per step."""

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
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    router_shift: RouterShiftOptions = field(default_factory=RouterShiftOptions)
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
            raise ValueError(
                f"eval_samples must be >= 0 and eval_problems >= 1, got {self.eval_samples}, {self.eval_problems}"
            )
        if not 0 < self.collapse_drop < 1:
            raise ValueError(f"collapse_drop must be in (0, 1), got {self.collapse_drop}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 (a period in steps), got {self.checkpoint_every}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 1, or 0 for no validation, got {self.eval_every}")
        if self.kl_coef < 0 or self.max_bad_steps < 1:
            raise ValueError(f"kl_coef >= 0 and max_bad_steps >= 1 required, got {self.kl_coef}, {self.max_bad_steps}")
        self.options = Options(self.objective, self.router_shift, self.routing.control)  # checked together
        r3 = self.routing.control == "replay_rollout"
        if self.rollout.record_routing is None:
            own_dtype = self.rollout.dtype is not None and self.rollout.dtype != self.dtype
            self.rollout.record_routing = r3 or own_dtype
        elif r3 and not self.rollout.record_routing:
            raise ValueError(
                "routing.control=replay_rollout replays the rollout's routing: rollout.record_routing cannot be false"
            )
        rc = self.rollout_correction
        sequence_objective = get_objective(self.objective.name).level == "sequence"
        if rc.reduce is not None and not (rc.level == "token" and sequence_objective):
            raise ValueError(
                f"rollout_correction.reduce applies to level=token with a sequence objective (gspo, gmpo, "
                f"rspo), not to level={rc.level} with {self.objective.name}"
            )

    @property
    def max_new_tokens(self) -> int:
        """The response length limit: rollout.max_new_tokens, or the task's."""
        return self.task.max_new_tokens if self.rollout.max_new_tokens is None else self.rollout.max_new_tokens

    def routing_options(self) -> RoutingOptions:
        return self.options.routing_options(log=self.log_router)

    @property
    def updates_per_step(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.group_size // self.mini_batch_size * self.ppo_epochs

    def objective_hparams(self) -> dict:
        """The keyword hyperparameters passed to rspo.objectives.compute_policy_loss."""
        return self.options.objective_hparams(norm_length=self.max_new_tokens)
