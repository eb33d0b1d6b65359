"""Router-aware objectives inside TRL's GRPOTrainer (``pip install rspo[trl]``; TRL >= 1.16, < 1.17).

    from rspo.integrations.trl import RSPOConfig, RSPOTrainer
    args = RSPOConfig(output_dir="out", objective="rspo", router_shift_gamma_min=0.5,
                      per_device_train_batch_size=64, steps_per_generation=2, num_generations=8, ...)
    trainer = RSPOTrainer(model=moe_model, reward_funcs=reward, args=args, train_dataset=ds)
    trainer.train()

Our options are those of ``rspo train``'s config with the section joined by ``_``
(``router_shift.gamma_min`` -> ``router_shift_gamma_min``, ``routing.control`` -> ``routing_control``);
the objective's clip range, dual clip and aggregation are TRL's own ``epsilon``/``epsilon_high``,
``delta`` and ``loss_type``.

What the subclass changes, and nothing else:
- The pass that computes the old log-probs also captures the old router trace (top-K expert
  indices and router log-probs at the positions that score the completion). TRL skips that pass
  when it judges a step on-policy (then old = current, detached); with router shift on, that would
  make gamma always 1, so the subclass runs it whenever TRL did not.
- The loss is ``rspo.objectives.compute_policy_loss`` on the completion tokens, with gamma from
  the current router gathered in the same forward as the log-probs. Every ``GRPOConfig`` option
  that acts inside TRL's loss is applied exactly as TRL applies it, or rejected at construction
  (:data:`TRL_OPTIONS` classifies each one; the README has the table): the vLLM
  importance-sampling ratio in all its modes, the off-policy sequence mask, the high-entropy token
  mask (all three as rollout-correction weights, where TRL multiplies its per-token loss), the loss
  type's normalisation, dual clip (``delta``), the KL term with its bias correction, the static
  entropy bonus, and the MoE aux loss. A GRPOConfig option this module does not know (a newer TRL)
  is an error unless left at its default.
- Routing replay stays on from the training forward through TRL's backward, so layers recomputed
  by gradient checkpointing (on by default in TRL) see the same routing.
- ``routing_control='freeze'`` freezes the router; ``'replay_indices'`` and ``'replay_logits'``
  replay the old routing in the training forward (the trace is then kept on all positions).

Defaults that differ from GRPOConfig's: ``epsilon``, ``epsilon_high``, ``loss_type`` and
``importance_sampling_level`` default to None = the objective's own (``loss_type`` 'dapo', TRL's
default, for token objectives; 'grpo', the only normalisation a sequence objective has, for gspo,
gmpo and rspo). ``router_aux_loss_coef`` defaults to 0.0 where TRL takes the model config's (0.001
for Qwen3-MoE): the load-balancing loss moves the router for its own reason, which is router shift
the objective did not ask for, and ``rspo train`` leaves it off too (``routing.aux_loss_coef``);
set a value (or None for TRL's behaviour) to add it as TRL does.
"""

from __future__ import annotations

import atexit
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from rspo.config import build, check_value, field_docs
from rspo.objectives import (
    LossAgg,
    RouterShiftForm,
    RouterShiftPlacement,
    WeightsReduce,
    compute_policy_loss,
    get_objective,
    list_objectives,
)
from rspo.options import Names, ObjectiveOptions, Options, RouterShiftOptions, router_shift_fields
from rspo.routing import ExpertAgg, LayerAgg, RouterProb, RouterTrace
from rspo.routing.step import RoutingControl, RoutingOptions, RoutingStep
from rspo.scoring import Scorer
from rspo.tasks import Task


def task_dataset(task: Task, examples: Sequence[Any]) -> Dataset:
    """A TRL prompt dataset for ``examples`` of ``task``: ``prompt`` (text, or chat messages that TRL renders
    with the tokenizer's chat template) and ``example_id`` (the index the reward function looks up)."""
    prompts = [task.prompt(x) for x in examples]
    if len({isinstance(p, str) for p in prompts}) > 1:
        raise ValueError(f"task {task.name!r} mixes text and chat prompts; TRL needs one kind per dataset")
    return Dataset.from_dict({"prompt": prompts, "example_id": list(range(len(examples)))})


def task_reward_func(task: Task, examples: Sequence[Any], timeout_s: float | None = 10.0, workers: int = 1):
    """A TRL reward function scoring completions of :func:`task_dataset` prompts with the task's verdicts
    (in scoring workers with a time limit per call, as ``rspo train`` scores them)."""
    scorer = Scorer(task, timeout_s=timeout_s, workers=workers)  # workers start at the first call, then stay

    def reward(prompts, completions, example_id, **kwargs) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # chat: the assistant turn
        return scorer.score(texts, [examples[i] for i in example_id]).rewards

    reward.__name__ = f"{task.name}_reward"
    return reward


# Every GRPOConfig option that is not a TrainingArguments one, classified for TRL 1.16 (a test fails
# naming any option a newer TRL adds). TrainingArguments' own options drive transformers' Trainer
# loop, which the subclass does not touch.
_HONOURED = """epsilon epsilon_high delta loss_type importance_sampling_level beta use_bias_correction_kl
    top_entropy_quantile off_policy_mask_threshold vllm_importance_sampling_correction vllm_importance_sampling_mode
    vllm_importance_sampling_clip_max vllm_importance_sampling_clip_min vllm_importance_sampling_cap entropy_coef
    router_aux_loss_coef max_completion_length"""
_REJECTED = """use_adaptive_entropy entropy_coef_min entropy_coef_max entropy_coef_delta entropy_target
    sapo_temperature_neg sapo_temperature_pos vespo_k_pos vespo_lambda_pos vespo_k_neg vespo_lambda_neg"""
_OUTSIDE = """model_init_kwargs trust_remote_code disable_dropout cast_lm_head_to_fp32 num_generations
    num_generations_eval ds3_gather_for_generation shuffle_dataset pad_to_multiple_of generation_batch_size
    steps_per_generation temperature top_p top_k min_p generation_kwargs chat_template_kwargs repetition_penalty
    cache_implementation use_vllm vllm_mode vllm_model_impl vllm_enable_sleep_mode vllm_structured_outputs_regex
    vllm_server_base_url vllm_server_host vllm_server_port vllm_server_timeout vllm_group_port
    vllm_gpu_memory_utilization vllm_max_model_length vllm_tensor_parallel_size num_iterations reward_weights
    multi_objective_aggregation scale_rewards mask_truncated_completions sync_ref_model ref_model_mixup_alpha
    ref_model_sync_steps max_tool_calling_iterations log_completions log_multimodal num_completions_to_print
    log_unique_prompts log_completions_hub_repo use_transformers_continuous_batching
    transformers_continuous_batching_config use_transformers_paged"""
TRL_OPTIONS: dict[str, str] = {
    **dict.fromkeys(_HONOURED.split(), "loss: honoured"),  # inside TRL's _compute_loss: applied as TRL does
    **dict.fromkeys(_REJECTED.split(), "loss: rejected"),  # a loss no rspo objective has: error unless default
    **dict.fromkeys(_OUTSIDE.split(), "outside the loss"),  # generation, rewards, old/ref passes, logging: TRL's code
}
# TRL's loss types -> our token aggregation (token objectives); sequence objectives have one (TRL's 'grpo')
TRL_LOSS_AGG: dict[str, LossAgg] = {
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}


def _grpo_fields() -> dict[str, Any]:
    """GRPOConfig's own options (not TrainingArguments') and their defaults."""
    from transformers import TrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    out = {}
    for f in dataclasses.fields(GRPOConfig):
        if f.name not in base:
            out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return out


_RS_DOCS = field_docs(RouterShiftOptions)
_RS_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RouterShiftOptions)}


def _shift_option(name: str) -> Any:
    """RSPOConfig's field for router-shift option ``name``: its default and help from :mod:`rspo.options`."""
    return field(default=_RS_DEFAULTS[name], metadata={"help": _RS_DOCS[name]})


@dataclass
class RSPOConfig(GRPOConfig):
    objective: str = field(default="rspo", metadata={"help": f"rspo objective: {', '.join(list_objectives())}"})
    # The router-shift options of rspo.options.RouterShiftOptions, flat: router_shift_<option> (a test keeps
    # the two lists in step); router_shift itself is the option `enabled`.
    router_shift: bool | None = _shift_option("enabled")
    router_shift_expert_agg: ExpertAgg = _shift_option("expert_agg")
    router_shift_layer_agg: LayerAgg = _shift_option("layer_agg")
    router_shift_gamma_min: float = _shift_option("gamma_min")
    router_shift_placement: RouterShiftPlacement = _shift_option("placement")
    router_shift_form: RouterShiftForm = _shift_option("form")
    router_shift_stop_gradient: bool = _shift_option("stop_gradient")
    router_shift_top_k: int | None = _shift_option("top_k")
    router_shift_prob: RouterProb = _shift_option("prob")
    router_shift_clip_threshold: float | None = _shift_option("clip_threshold")
    router_shift_clip_drop: bool = _shift_option("clip_drop")
    routing_control: RoutingControl = field(
        default="none", metadata={"help": "Routing-control baseline: none, freeze, replay_logits, replay_indices."}
    )
    rollout_weights_reduce: WeightsReduce = field(
        default="arithmetic",
        metadata={
            "help": "How per-token weights (token_* vLLM IS ratios, the entropy mask) reach a sequence "
            "objective (gspo, gspo_token, gmpo, rspo): arithmetic mean (what TRL's sequence-level "
            "loss does) or geometric (verl's geo_mean)."
        },
    )
    # GRPOConfig options whose default depends on the objective (None = the objective's own)
    epsilon: float | None = field(
        default=None,
        metadata={"help": "Lower clip (ratio space for grpo/gspo, log space for gmpo/rspo); None = the objective's."},
    )
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clip; None = the objective's."})
    loss_type: str | None = field(
        default=None,
        metadata={
            "help": "TRL's normalisation: dapo, bnpo, grpo, dr_grpo (token objectives; None = dapo, TRL's "
            "default); sequence objectives have grpo only (None = grpo)."
        },
    )
    importance_sampling_level: str | None = field(
        default=None,
        metadata={
            "help": "None = the objective's (token for grpo, sequence otherwise); it selects the ratio of "
            "the KL bias correction. A value that contradicts the objective is an error."
        },
    )
    router_aux_loss_coef: float | None = field(
        default=0.0,
        metadata={
            "help": "MoE load-balancing loss coefficient; 0.0 (default) = off, as rspo train; None = the "
            "model config's (TRL's default)."
        },
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(RSPOConfig)
        for f in dataclasses.fields(RSPOConfig):
            if f.name in RSPO_FIELDS:
                check_value(hints[f.name], getattr(self, f.name), f.name)  # Literal options, types
        if self.objective not in list_objectives():
            raise ValueError(f"objective={self.objective!r}; valid: {', '.join(list_objectives())}")
        self._check_trl_options()
        self._resolve_objective_defaults()
        super().__post_init__()
        token = get_objective(self.objective).level == "token"
        objective = {
            "name": self.objective,
            "clip_low": self.epsilon,
            "clip_high": self.epsilon_high,
            "loss_agg": TRL_LOSS_AGG[self.loss_type] if token else None,
            "dual_clip": self.delta,
        }
        objective = build(ObjectiveOptions, objective, name=TRL_NAMES.objective.__getitem__)
        shift = {k: getattr(self, _trl_field(k)) for k in router_shift_fields()}
        shift = build(RouterShiftOptions, shift, name=_trl_field)
        if self.routing_control == "replay_rollout":
            raise ValueError(
                "routing_control='replay_rollout' (R3) replays the experts the rollout engine chose, and TRL 1.16 "
                "returns none: neither transformers' generate nor its vLLM path carries routed experts. TRL would "
                "need vLLM's enable_return_routed_experts and each completion's routed_experts passed into the loss "
                "inputs (like old_per_token_logps). Use replay_indices (R2, from the old pass) or rspo train / verl"
            )
        self.options = Options(objective, shift, self.routing_control, names=TRL_NAMES)
        self.router_shift = shift.enabled

    def _check_trl_options(self) -> None:
        defaults = _grpo_fields()
        unknown = [k for k in defaults if k not in TRL_OPTIONS and getattr(self, k) != defaults[k]]
        if unknown:
            raise ValueError(
                f"GRPOConfig option(s) {unknown} are not known to rspo's TRL adapter (written for TRL 1.16); they "
                f"may act inside the loss RSPOTrainer replaces. Leave them at their defaults or use trl>=1.16,<1.17"
            )
        for k, how in TRL_OPTIONS.items():
            if how == "loss: rejected" and k in defaults and getattr(self, k) != defaults[k]:
                raise ValueError(
                    f"{k}={getattr(self, k)!r}: RSPOTrainer does not support it (leave the default {defaults[k]!r}); "
                    f"TRL applies it in a loss rspo's objectives do not have"
                )
        if self.loss_type in ("cispo", "sapo", "vespo", "luspo"):
            raise ValueError(
                f"loss_type={self.loss_type!r} is its own objective in TRL; RSPOTrainer's objectives "
                f"take loss_type dapo, bnpo, grpo or dr_grpo"
            )
        if self.loss_type is not None and self.loss_type not in TRL_LOSS_AGG:
            raise ValueError(f"loss_type={self.loss_type!r}; valid: {', '.join(TRL_LOSS_AGG)}")

    def _resolve_objective_defaults(self) -> None:
        obj = get_objective(self.objective)
        if obj.level == "sequence":
            if self.loss_type not in (None, "grpo"):
                raise ValueError(
                    f"loss_type={self.loss_type!r} does not apply to the sequence objective "
                    f"{self.objective!r}: its loss is a mean over sequences (TRL's 'grpo')"
                )
            self.loss_type = "grpo"
        elif self.loss_type is None:
            self.loss_type = "dapo"  # TRL's default
        level = "token" if obj.level == "token" else "sequence"
        if self.importance_sampling_level not in (None, level):
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r} contradicts objective "
                f"{self.objective!r}, whose ratio is {level}-level (leave it None)"
            )
        self.importance_sampling_level = level
        if self.rollout_weights_reduce != "arithmetic" and obj.level == "token":
            raise ValueError(f"rollout_weights_reduce applies to sequence objectives, not {self.objective!r}")
        if self.delta is not None and "dual_clip" not in obj.defaults:
            raise ValueError(f"delta (dual clip) does not apply to {self.objective!r}; it has no unbounded ratio term")
        self.epsilon = obj.defaults["clip_low"] if self.epsilon is None else self.epsilon
        self.epsilon_high = obj.defaults["clip_high"] if self.epsilon_high is None else self.epsilon_high

    def objective_hparams(self) -> dict[str, Any]:
        return self.options.objective_hparams(norm_length=self.max_completion_length)

    def routing_options(self) -> RoutingOptions:
        return self.options.routing_options()


def _trl_field(option: str) -> str:
    """RSPOConfig's field for router-shift option ``option``."""
    return "router_shift" if option == "enabled" else f"router_shift_{option}"


TRL_NAMES = Names(
    objective={
        "name": "objective",
        "clip_low": "epsilon",
        "clip_high": "epsilon_high",
        "loss_agg": "loss_type",
        "norm_length": "max_completion_length",
        "dual_clip": "delta",
    },
    router_shift="router_shift_{}",
    enabled="router_shift",
    control="routing_control",
)
"""RSPOConfig's names of the options (TRL's own where it has one)."""
RSPO_FIELDS = {f.name for f in dataclasses.fields(RSPOConfig)} - {f.name for f in dataclasses.fields(GRPOConfig)}

# The GRPOTrainer internals the subclass overrides or calls, with the parameters it relies on (TRL 1.16).
TRL_INTERNALS: dict[str, tuple[str, ...]] = {
    "_compute_loss": ("self", "model", "inputs"),
    "_get_per_token_logps_and_entropies": (
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
    ),
    "_generate_and_score_completions": ("self", "inputs"),
    "get_high_entropy_mask": ("self", "entropies", "mask", "threshold"),
    "get_off_policy_mask": (
        "advantages",
        "per_token_logps",
        "sampling_per_token_logps",
        "mask",
        "off_policy_threshold",
    ),
}
# GRPOTrainer attributes the loss reads (set by its __init__)
TRL_ATTRIBUTES = (
    "aux_loss_enabled",
    "router_aux_loss_coef",
    "beta",
    "loss_type",
    "top_entropy_quantile",
    "off_policy_mask_threshold",
    "use_vllm",
    "vllm_importance_sampling_correction",
    "_entropy_bonus_enabled",
    "entropy_coef",
    "max_completion_length",
    "_metrics",
)
# Forwarded to the policy's forward as TRL forwards them (None when absent)
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def check_trl_internals(cls: type = GRPOTrainer) -> None:
    """Raise a clear error when a GRPOTrainer method RSPOTrainer overrides or calls is gone or has changed its
    parameters (TRL moves fast; these are private methods)."""
    import inspect

    import trl

    problems = []
    for name, params in TRL_INTERNALS.items():
        fn = getattr(cls, name, None)
        if fn is None:
            problems.append(f"{name} is gone")
            continue
        have = tuple(inspect.signature(fn).parameters)
        if have[: len(params)] != params:
            problems.append(f"{name}{params} is now {name}{have}")
    if problems:
        raise RuntimeError(
            f"rspo's TRL adapter supports trl>=1.16,<1.17 and relies on GRPOTrainer internals that changed in trl "
            f"{trl.__version__}: {'; '.join(problems)}. Install trl 1.16, or update rspo.integrations.trl"
        )


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_EXIT_HOOK: list[bool] = []


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, while it is still alive (idempotent).

    Without it, gloo's worker threads can still hold finished work (tensors with Python references) when
    the interpreter is torn down; releasing them then needs the GIL and aborts the process with
    "terminate called without an active exception" (SIGABRT), one two-process run in a few on a loaded
    machine (pytorch issue 190489). accelerate destroys the group only in ``end_training()``, which
    transformers' Trainer never calls. Registered after a successful ``train()`` only: after a failure a
    peer may still be inside a collective.
    """
    if not _EXIT_HOOK:
        atexit.register(_destroy_process_group)
        _EXIT_HOOK.append(True)


class RSPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is any rspo objective, with router shift from real router probabilities."""

    args: RSPOConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_trl_internals()
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, RSPOConfig):
            raise TypeError("RSPOTrainer needs args=RSPOConfig(...)")
        missing = [a for a in TRL_ATTRIBUTES if not hasattr(self, a)]
        if missing:
            raise RuntimeError(
                f"rspo's TRL adapter supports trl>=1.16,<1.17; this GRPOTrainer has no {missing}, "
                f"which the loss reads. Install trl 1.16, or update rspo.integrations.trl"
            )
        self.routing = RoutingStep(self.accelerator.unwrap_model(self.model), self.args.routing_options())
        self._hparams = self.args.objective_hparams()
        self._router_mode: str | None = None
        self._old = None

    def train(self, *args: Any, **kwargs: Any):
        """transformers' ``train``, then :func:`destroy_process_group_at_exit`."""
        out = super().train(*args, **kwargs)
        destroy_process_group_at_exit()
        return out

    # -------------------------------------------------------------- the forward, with router hooks
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        policy = self.accelerator.unwrap_model(model) is self.accelerator.unwrap_model(self.model)
        if self._router_mode is None or not policy or not self.routing.active:  # reference model etc.: untouched
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *a, **kw
            )
        mode, self._router_mode = self._router_mode, None
        s = input_ids.shape[1]
        resp = slice(s - logits_to_keep - 1, s - 1)  # the positions whose logits score the completion
        # the old pass runs in row chunks; the training forward replays (kept on through TRL's backward)
        ctx = self.routing.capture(resp, chunks="batch") if mode == "capture" else self.routing.forward(self._old, resp)
        with ctx as rec:
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *a, **kw)
        self._captured = rec.trace
        return out

    # -------------------------------------------------------------- old pass: logps + trace together
    def _generate_and_score_completions(self, inputs):
        self.routing.end()  # generation and the old pass use the model's own routing
        if not self.routing.active:
            return super()._generate_and_score_completions(inputs)
        self._router_mode, self._captured = "capture", None
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._router_mode = None
        if self._captured is None:  # TRL judged the step on-policy and skipped the old pass: run it
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
            am = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
            self._router_mode = "capture"
            with torch.no_grad():
                old, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, ids, am, out["completion_ids"].size(1), batch_size=self.args.per_device_train_batch_size
                )
            out["old_per_token_logps"] = old
        trace = self._captured
        out["router_old_idx"], out["router_old_logp"] = trace.topk_idx, trace.logp
        if trace.weights is not None:
            out["router_old_weights"] = trace.weights
        return out

    # -------------------------------------------------------------- the loss
    def _compute_loss(self, model, inputs):
        """TRL's ``_compute_loss`` with an rspo objective in place of TRL's clipped surrogate; every other term
        as TRL computes it (see the module docstring; the tests compare with TRL's own on the same inputs)."""
        args = self.args
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        t = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        s = input_ids.shape[1]
        resp = slice(s - t - 1, s - 1)
        old = None
        if self.routing.active:
            full = RouterTrace(inputs["router_old_idx"], inputs["router_old_logp"], inputs.get("router_old_weights"))
            old = self.routing.old_trace(full, resp)
            self._old, self._router_mode = old, "gather"
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            t,
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in _FORWARD_KEYS},
        )  # (B, T)
        gamma = self.routing.gamma(old, self._captured) if old is not None else None
        old_logps = inputs.get("old_per_token_logps")
        old_logps = logps.detach() if old_logps is None else old_logps  # TRL skips the old pass on-policy
        mask = mask.to(logps.dtype)
        adv = inputs["advantages"].to(logps.dtype)  # (B,) or (B, T)
        adv2 = adv if adv.dim() == 2 else adv[:, None]
        mode = "train" if self.model.training else "eval"
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0

        # TRL multiplies its per-token loss by these: here they are rollout-correction weights
        weights, entropy_mask = [], None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile).to(mask.dtype)
            weights.append(entropy_mask)  # (B, T)
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old_logps)
            weights.append(self.get_off_policy_mask(adv2, logps, sampling, mask, self.off_policy_mask_threshold))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"].to(logps.dtype))  # (B, T) or (B, 1)
        w = None
        for x in weights:  # (B, T) if any factor is per token, else (B, 1)
            w = x if w is None else w * x
        level = get_objective(args.objective).level
        reduce = (
            args.rollout_weights_reduce if w is not None and level == "sequence" and w.shape == mask.shape else None
        )
        loss, metrics = compute_policy_loss(
            args.objective,
            logps,
            old_logps.to(logps.dtype),
            adv,
            mask,
            router_shift=gamma if args.router_shift else None,
            rollout_weights=w,
            rollout_weights_reduce=reduce,
            **self._hparams,
        )
        # our sequence means run over sequences with tokens, TRL's over all rows; dapo: TRL's global normaliser
        if self.loss_type == "dapo":
            scale = mask.sum() / self._dapo_normalizer(inputs, mode)
        elif self.loss_type in ("grpo", "dr_grpo"):
            scale = (mask.sum(-1) > 0).sum() / mask.shape[0] / accum
        else:  # bnpo
            scale = 1.0 / accum
        loss = loss * scale

        if self.beta != 0.0:  # TRL's k3 KL to the reference, bias-corrected by the (token or sequence) ratio
            ref = inputs["ref_per_token_logps"]
            kl = torch.exp(ref - logps) - (ref - logps) - 1  # (B, T)
            if args.use_bias_correction_kl:
                log_ratio = logps - old_logps
                if args.importance_sampling_level == "sequence":
                    log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
                kl = kl * torch.exp(log_ratio)
            loss = loss + self.beta * self._trl_aggregate(kl, mask, inputs, mode)
            metrics["kl"] = float(((kl * mask).sum() / mask.sum().clamp(min=1)).detach())
        if self._entropy_bonus_enabled:  # static coefficient (adaptive control is rejected by RSPOConfig)
            # TRL logs its policy loss here: KL included, accumulation scaling not
            metrics["policy_loss"] = float(loss.detach() * (accum if self.loss_type != "dapo" else 1.0))
            eff = mask if entropy_mask is None else mask * entropy_mask
            loss = loss - self.entropy_coef * (entropies * eff).sum() / eff.sum().clamp(min=1.0) / accum
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accum
            metrics["aux_loss"] = float(aux_loss.detach())
        if old is not None:
            router = self.routing.metrics(old, self._captured, gamma, mask)
            metrics.update({k: v for k, v in router.items() if isinstance(v, float)})  # TRL logs numbers
        metrics["entropy"] = float(entropies.detach()[mask > 0].mean())
        keys = sorted(metrics)  # one gather for all metrics (a process-group call per metric would be slow)
        local = torch.tensor([float(metrics[k]) for k in keys], device=logps.device)
        gathered = self.accelerator.gather(local[None]).nanmean(0).tolist()
        for k, v in zip(keys, gathered, strict=True):
            self._metrics[mode][k].append(v)
        return loss

    def _trl_aggregate(self, x: torch.Tensor, mask: torch.Tensor, inputs: dict, mode: str) -> torch.Tensor:
        """A per-token ``(B, T)`` term reduced as TRL's loss type reduces its per-token loss (accumulation
        scaling included)."""
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "grpo":
            return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accum
        if self.loss_type == "bnpo":
            return (x * mask).sum() / mask.sum().clamp(min=1.0) / accum
        if self.loss_type == "dr_grpo":
            return (x * mask).sum() / (x.size(0) * self.max_completion_length) / accum
        return (x * mask).sum() / self._dapo_normalizer(inputs, mode)

    def _dapo_normalizer(self, inputs: dict, mode: str) -> torch.Tensor:
        """TRL's dapo denominator: the generation batch's tokens (``num_items_in_batch``) per process, scaled
        to one accumulation window in training."""
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer
