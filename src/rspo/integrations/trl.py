"""Router-aware objectives inside TRL's GRPOTrainer (``pip install rspo[trl]``).

    from rspo.integrations.trl import RSPOConfig, RSPOTrainer
    args = RSPOConfig(output_dir="out", objective="rspo", router_shift_gamma_min=0.5,
                      per_device_train_batch_size=64, steps_per_generation=2, num_generations=8, ...)
    trainer = RSPOTrainer(model=moe_model, reward_funcs=reward, args=args, train_dataset=ds)
    trainer.train()

Option names are those of ``rspo train``'s config with the section joined by ``_``
(``objective.clip_low`` -> ``clip_low``, ``router_shift.gamma_min`` -> ``router_shift_gamma_min``,
``routing.control`` -> ``routing_control``).

What the subclass changes, and nothing else:
- The pass that computes the old log-probs also captures the old router trace (top-K expert
  indices and router log-probs at the positions that score the completion). TRL skips that pass
  when it judges a step on-policy (then old = current, detached); with router shift on, that would
  make gamma always 1, so the subclass runs it whenever TRL did not.
- The loss is ``rspo.objectives.compute_policy_loss`` on the completion tokens, with gamma from
  the current router gathered in the same forward as the log-probs; TRL's KL term (``beta``) and
  MoE aux loss are added as TRL does (TRL turns the aux loss on for MoE models with the model
  config's ``router_aux_loss_coef``; set ``router_aux_loss_coef=0`` to match ``rspo train``'s
  default), and the loss is scaled for gradient accumulation as TRL's ``grpo`` loss type is.
  Our metrics (``clip_ratio/*``, ``ratio/*``, ``router/*``) appear in TRL's logs next to its own.
- Routing replay stays on from the training forward through TRL's backward, so layers recomputed
  by gradient checkpointing (on by default in TRL) see the same routing.
- ``routing_control='freeze'`` freezes the router; ``'replay_indices'`` and ``'replay_logits'``
  replay the old routing in the training forward (the trace is then kept on all positions).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from rspo.config import check_value
from rspo.objectives import LossAgg, RouterShiftForm, RouterShiftPlacement, compute_policy_loss, list_objectives
from rspo.routing import ExpertAgg, LayerAgg, RouterProb, RouterTrace
from rspo.routing.step import RoutingControl, RoutingOptions, RoutingStep
from rspo.scoring import Scorer
from rspo.tasks import Task
from rspo.train_config import objective_hparams, resolve_router_shift


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


@dataclass
class RSPOConfig(GRPOConfig):
    objective: str = field(default="rspo", metadata={"help": f"rspo objective: {', '.join(list_objectives())}"})
    clip_low: float | None = field(
        default=None, metadata={"help": "objective.clip_low (None: the objective's default)"}
    )
    clip_high: float | None = field(default=None, metadata={"help": "objective.clip_high"})
    objective_loss_agg: LossAgg | None = field(
        default=None, metadata={"help": "objective.loss_agg for grpo / gspo_token"}
    )
    router_shift: bool | None = field(default=None, metadata={"help": "router_shift.enabled (None: on for rspo)"})
    router_shift_expert_agg: ExpertAgg = "log_mean"
    router_shift_layer_agg: LayerAgg = "geo_mean"
    router_shift_gamma_min: float = 0.5
    router_shift_placement: RouterShiftPlacement = "after_clip"
    router_shift_form: RouterShiftForm = "weight"
    router_shift_stop_gradient: bool = True
    router_shift_top_k: int | None = None
    router_shift_prob: RouterProb = "full"
    routing_control: RoutingControl = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        hints = typing.get_type_hints(RSPOConfig)
        for f in dataclasses.fields(RSPOConfig):
            if f.name in RSPO_FIELDS:
                check_value(hints[f.name], getattr(self, f.name), f.name)  # Literal options, types
        if self.objective not in list_objectives():
            raise ValueError(f"objective={self.objective!r}; valid: {', '.join(list_objectives())}")
        self.router_shift = resolve_router_shift(self.objective, self.router_shift)

    def objective_hparams(self) -> dict[str, Any]:
        return objective_hparams(
            self.objective, clip_low=self.clip_low, clip_high=self.clip_high, loss_agg=self.objective_loss_agg,
            norm_length=self.max_completion_length, router_shift=self.router_shift,
            placement=self.router_shift_placement, stop_gradient=self.router_shift_stop_gradient,
            form=self.router_shift_form,
        )  # fmt: skip

    def routing_options(self) -> RoutingOptions:
        return RoutingOptions(shift=bool(self.router_shift), expert_agg=self.router_shift_expert_agg,
                              layer_agg=self.router_shift_layer_agg, gamma_min=self.router_shift_gamma_min,
                              stop_gradient=self.router_shift_stop_gradient, top_k=self.router_shift_top_k,
                              prob=self.router_shift_prob, control=self.routing_control)  # fmt: skip


RSPO_FIELDS = {f.name for f in dataclasses.fields(RSPOConfig)} - {f.name for f in dataclasses.fields(GRPOConfig)}


class RSPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is any rspo objective, with router shift from real router probabilities."""

    args: RSPOConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, RSPOConfig):
            raise TypeError("RSPOTrainer needs args=RSPOConfig(...)")
        self.routing = RoutingStep(self.accelerator.unwrap_model(self.model), self.args.routing_options())
        self._hparams = self.args.objective_hparams()
        self._router_mode: str | None = None
        self._old = None

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
            model, input_ids, attention_mask, t, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled
        )  # (B, T)
        gamma = self.routing.gamma(old, self._captured) if old is not None else None
        old_logps = inputs.get("old_per_token_logps")
        old_logps = logps.detach() if old_logps is None else old_logps  # TRL skips the old pass on-policy
        adv = inputs["advantages"].to(logps.dtype)
        loss, metrics = compute_policy_loss(
            args.objective, logps, old_logps.to(logps.dtype), adv, mask.to(logps.dtype),
            router_shift=gamma if args.router_shift else None, **self._hparams,
        )  # fmt: skip
        mode = "train" if self.model.training else "eval"
        if self.beta != 0.0:  # TRL's k3 KL to the reference model, token-averaged per sequence then over sequences
            ref = inputs["ref_per_token_logps"]
            kl = torch.exp(ref - logps) - (ref - logps) - 1
            loss = loss + self.beta * ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
            metrics["kl"] = float(((kl * mask).sum() / mask.sum().clamp(min=1)).detach())
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
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
