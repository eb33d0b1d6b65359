"""RSPO in verl (``pip install rspo[verl]``): router capture on verl's FSDP engine and a policy loss.

verl calls a policy loss with a fixed set of tensors and no router data, so a registered loss alone cannot
do RSPO. This module adds the router side to verl's engine path (verl 0.9.x: engine workers, FSDP/FSDP2):

1. **Old pass** (``compute_log_prob``, no grad, ``calculate_entropy``): forward hooks on the MoE routers of
   the actor's module record, per token and MoE layer, the old top-K experts and their router log-probs
   (reduced to K inside the hook). They leave the engine next to ``log_probs`` as full-sequence nested
   tensors, ``model_output["rspo_old_topk_idx"]`` ``(B, j, L, K)`` and ``["rspo_old_router_logp"]``, so verl
   carries them like its own outputs (into the batch, through micro-batching and dynamic-batch reordering).
2. **Update** (``update_actor``, with grad): the same hooks gather the *current* router log-probs at the
   old experts given in the micro-batch (first call per router only: a checkpointed layer recomputed in
   backward is not recorded twice) and the current top-K (for the non-shifted ratio).
3. **Loss** (:func:`rspo_ppo_loss`, in place of verl's ``ppo_loss``): gamma with :mod:`rspo.routing`
   (stop-gradient, floor ``gamma_min``), at the response positions exactly as verl slices ``log_probs``
   (``no_padding_2_padding``: the position whose output predicts response token t); the objective from
   :func:`rspo.objectives.compute_policy_loss`, with verl's ``rollout_is_weights``; normalised over the
   global mini-batch as verl's ``agg_loss`` (``batch_num_tokens`` / ``global_batch_size`` and ``dp_size``),
   plus verl's entropy bonus and KL loss.

Configuration: one section of verl's config, ``actor_rollout_ref.rspo`` (Hydra: ``+actor_rollout_ref.rspo.
objective=rspo``...; fields of :class:`VerlRSPOConfig`). Without it the plugin changes nothing.
verl's own actor options are honoured or rejected one by one (:data:`VERL_ACTOR_OPTIONS`).

Not covered (an error, not a silent no-op): Ulysses sequence parallelism, fused kernels, Megatron and
VeOmni engines, verl's routing replay, the v0 (DataProto) trainer, rollout-correction bypass mode (no
old pass: the update finds no old router record and says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import os
from collections.abc import Mapping
from typing import Any

import torch

from rspo.config import build, check_value
from rspo.errors import ConfigError
from rspo.objectives import WeightsReduce, aggregation_count, compute_policy_loss, get_objective, list_objectives
from rspo.options import Names, ObjectiveOptions, Options, RouterShiftOptions, router_shift_fields
from rspo.routing.capture import RouterTrace
from rspo.routing.step import (
    OldTrace,
    RoutingControl,
    RoutingStep,
    router_gamma,
    router_metrics,
    routing_agreement,
)

Tensor = torch.Tensor
SUPPORTED_VERL = ">=0.9.1,<0.10"
"""The verl range the plugin is written and tested against (``check_verl_internals`` guards it)."""
NAMESPACE = "actor_rollout_ref.rspo"
OLD_IDX, OLD_LOGP = "rspo_old_topk_idx", "rspo_old_router_logp"  # old pass -> batch -> update
CUR_IDX, CUR_LOGP = "rspo_cur_topk_idx", "rspo_cur_router_logp"  # update's model_output -> loss
OWN_IDX = "rspo_old_own_topk_idx"  # R3: the old router's own top-K, which the replay overrode (diagnostics)
ROUTED = "routed_experts"  # verl's field for the rollout's routing (rollout.enable_rollout_routing_replay)


SECTION_KEYS = (
    "objective",
    "router_shift",
    *(k for k in router_shift_fields() if k != "enabled"),
    "routing_control",
    "rollout_weights_reduce",
)
"""The keys of ``actor_rollout_ref.rspo``: the objective, the router-shift options of :mod:`rspo.options`
(``router_shift`` is the option ``enabled``), the routing control and the rollout-weights reduction."""


def _key(option: str) -> str:
    return f"{NAMESPACE}.router_shift" if option == "enabled" else f"{NAMESPACE}.{option}"


VERL_NAMES = Names(
    objective={
        "name": f"{NAMESPACE}.objective",
        "clip_low": "actor_rollout_ref.actor.clip_ratio_low",
        "clip_high": "actor_rollout_ref.actor.clip_ratio_high",
        "loss_agg": "actor_rollout_ref.actor.loss_agg_mode",
        "norm_length": "actor_rollout_ref.actor.loss_scale_factor",
        "dual_clip": "actor_rollout_ref.actor.clip_ratio_c",
    },
    router_shift=f"{NAMESPACE}.{{}}",
    enabled=f"{NAMESPACE}.router_shift",
    control=f"{NAMESPACE}.routing_control",
)
"""verl's names of the options (the clip range and aggregation are verl's own actor keys)."""


class VerlRSPOConfig:
    """``actor_rollout_ref.rspo``, parsed with rspo's config builder: the objective's name, the router-shift
    options (:class:`rspo.options.RouterShiftOptions`), the routing control (``none``; router freezing and
    replay are not wired into verl's engine: an error naming the key) and ``rollout_weights_reduce``
    (verl's per-token ``rollout_is_weights`` on a sequence objective: 'geometric', verl's geo_mean, when
    None, or 'arithmetic'). Errors name ``actor_rollout_ref.rspo.<key>``."""

    def __init__(self, **section: Any) -> None:
        unknown = sorted(set(section) - set(SECTION_KEYS))
        if unknown:
            near = {k: m[0] for k in unknown if (m := difflib.get_close_matches(k, SECTION_KEYS, n=1, cutoff=0.6))}
            hint = "".join(f" (did you mean {NAMESPACE}.{m}?)" for m in near.values())
            raise ConfigError(f"{NAMESPACE}.{unknown[0]}: unknown key{hint}; valid keys: {', '.join(SECTION_KEYS)}")
        data = dict(section)
        self.objective: str = check_value(str, data.pop("objective", "rspo"), f"{NAMESPACE}.objective")
        if self.objective not in list_objectives():
            raise ConfigError(f"{NAMESPACE}.objective={self.objective!r}; valid: {', '.join(list_objectives())}")
        control = data.pop("routing_control", "none")
        self.routing_control: RoutingControl = check_value(RoutingControl, control, f"{NAMESPACE}.routing_control")
        if self.routing_control not in ("none", "replay_rollout"):
            raise ConfigError(
                f"{NAMESPACE}.routing_control={self.routing_control!r}: router freezing and replay from the old "
                "pass are not wired into verl's engine by the plugin (none or replay_rollout; or use rspo train)"
            )
        self.rollout_weights_reduce: WeightsReduce | None = check_value(
            WeightsReduce | None, data.pop("rollout_weights_reduce", None), f"{NAMESPACE}.rollout_weights_reduce"
        )
        shift = {"enabled" if k == "router_shift" else k: v for k, v in data.items()}
        self.shift = build(RouterShiftOptions, shift, name=_key)
        # the router shift against the objective, now (the clip range comes from the actor, at install time)
        Options(ObjectiveOptions(self.objective), self.shift, names=VERL_NAMES)

    @property
    def router_shift(self) -> bool:
        return bool(self.shift.enabled)

    def __getattr__(self, name: str) -> Any:  # the router-shift options read as attributes (cfg.gamma_min)
        if name != "shift" and name in router_shift_fields():
            return getattr(self.shift, name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"VerlRSPOConfig(objective={self.objective!r}, {self.shift})"

    @classmethod
    def from_verl(cls, node: Mapping[str, Any] | None) -> VerlRSPOConfig | None:
        """The section as verl hands it to the worker (an OmegaConf node or a dict); None when absent."""
        if node is None:
            return None
        try:
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        except ImportError:
            data = dict(node)
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------
# verl's actor options: each honoured or rejected (checked when the loss is installed)
# ---------------------------------------------------------------------------------------------------------
VERL_ACTOR_OPTIONS = {
    "honoured": (
        "clip_ratio_low",
        "clip_ratio_high",
        "clip_ratio_c",
        "loss_agg_mode",
        "loss_scale_factor",
        "entropy_coeff",
        "use_kl_loss",
        "kl_loss_coef",
        "kl_loss_type",
        "ppo_epochs",
        "ppo_mini_batch_size",
        "ppo_micro_batch_size_per_gpu",
        "use_dynamic_bsz",
        "ppo_max_token_len_per_gpu",
        "shuffle",
    ),
    "rejected_unless_default": ("policy_loss.loss_mode",),
}
"""How the actor options ``ppo_loss`` reads reach our loss. ``clip_ratio_low/high`` are the objective's
clip (ratio epsilon for grpo, log-space for gmpo/rspo, the sequence epsilon for gspo, as in verl's own
losses); ``clip_ratio_c`` is the dual clip of grpo/gspo/gspo_token (GMPO/RSPO have none: a changed value
is an error); ``loss_agg_mode`` aggregates token objectives (sequence objectives are sequence means:
only the default token-mean, which verl's geo_mean ignores too, is accepted)."""
_TOKEN_AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")  # verl's names = ours


def options(actor: Any, cfg: VerlRSPOConfig) -> Options:
    """The run's options: the objective with verl's actor clip range, dual clip and aggregation, and the
    section's router-shift options (errors name the verl key)."""
    obj = get_objective(cfg.objective)
    loss_mode = actor.policy_loss.get("loss_mode", "vanilla") if actor.policy_loss is not None else "vanilla"
    if loss_mode != "vanilla":
        raise ConfigError(
            f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode!r}: with {NAMESPACE} the "
            f"objective is {NAMESPACE}.objective; leave loss_mode at vanilla"
        )
    low = actor.clip_ratio_low if actor.clip_ratio_low is not None else actor.clip_ratio
    high = actor.clip_ratio_high if actor.clip_ratio_high is not None else actor.clip_ratio
    objective: dict[str, Any] = {"name": cfg.objective, "clip_low": low, "clip_high": high}
    if "dual_clip" in obj.defaults:
        objective["dual_clip"] = actor.clip_ratio_c
    elif actor.clip_ratio_c != 3.0:
        raise ConfigError(
            f"actor_rollout_ref.actor.clip_ratio_c={actor.clip_ratio_c}: objective {cfg.objective!r} "
            "has no dual clip (leave it at 3.0)"
        )
    mode = actor.loss_agg_mode
    if "loss_agg" in obj.defaults:
        if mode not in _TOKEN_AGG:
            raise ConfigError(
                f"actor_rollout_ref.actor.loss_agg_mode={mode!r}: {cfg.objective} takes {', '.join(_TOKEN_AGG)}"
            )
        objective["loss_agg"] = mode
        if mode == "seq-mean-token-sum-norm":
            objective["norm_length"] = actor.loss_scale_factor  # None: the response length, per call
    elif mode != "token-mean":
        raise ConfigError(
            f"actor_rollout_ref.actor.loss_agg_mode={mode!r}: {cfg.objective} is a sequence-level "
            "objective (a mean over sequences); leave loss_agg_mode at token-mean"
        )
    built = build(ObjectiveOptions, objective, name=VERL_NAMES.objective.__getitem__)
    return Options(built, cfg.shift, cfg.routing_control, names=VERL_NAMES)


def objective_hparams(actor: Any, cfg: VerlRSPOConfig, norm_length: float | None = None) -> dict[str, Any]:
    """The objective's hyperparameters from verl's actor config and the section (errors name the verl key)."""
    return options(actor, cfg).objective_hparams(norm_length=norm_length)


# ---------------------------------------------------------------------------------------------------------
# The engine side: capture in the old pass, gather in the update
# ---------------------------------------------------------------------------------------------------------
class EngineRouterCapture:
    """Router hooks on a verl ``FSDPEngineWithLMHead`` (installed by :func:`install_capture`).

    Per micro-batch, ``prepare_model_inputs`` decides the pass and arms the hooks; ``prepare_model_outputs``
    disarms them and adds the router tensors to ``model_output`` in verl's own jagged layout (the same rows
    and tokens as ``log_probs``). The pass: with grad = the update (needs the old record in the micro-batch);
    no grad and ``calculate_entropy`` = the old pass; otherwise (reference log-probs) nothing.
    """

    def __init__(self, engine: Any, cfg: VerlRSPOConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self._step: RoutingStep | None = None
        self._hooks: contextlib.ExitStack | None = None  # the routing step's capture or forward, for one forward
        self._rec: Any = None
        self._mode: str | None = None
        self._rollout: RouterTrace | None = None

    @property
    def step(self) -> RoutingStep:
        """The routing step of the actor's module (built at first use: FSDP has wrapped the module by then)."""
        if self._step is None:
            opts = Options(
                ObjectiveOptions(self.cfg.objective), self.cfg.shift, self.cfg.routing_control, names=VERL_NAMES
            )
            self._step = RoutingStep(self.engine.module, opts.routing_options(log=True))
        return self._step

    def _check_engine(self, micro_batch: Any) -> None:
        import verl.utils.tensordict_utils as tu

        if getattr(self.engine, "use_ulysses_sp", False):
            raise NotImplementedError(
                f"{NAMESPACE}: Ulysses sequence parallelism is not supported (set ulysses_sequence_parallel_size=1)"
            )
        if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
            raise NotImplementedError(
                f"{NAMESPACE}: use_fused_kernels is not supported (the router hooks need the model's plain forward)"
            )

    def before(self, micro_batch: Any) -> None:
        """Arm the hooks for this micro-batch's forward: the routing step's capture in the old pass, its
        forward (a gather at the old experts) in the update (its hooks skip checkpoint recomputation)."""
        import verl.utils.tensordict_utils as tu

        self.after_abandoned()
        if self._step is not None:  # an update's replay stays on through its backward (checkpointed layers
            self._step.end()  # recompute with it); it ends here, before any other forward (a reference pass)
        calc_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
        if torch.is_grad_enabled():
            self._mode = "update"
        elif calc_entropy:
            self._mode = "old"
        else:
            return
        self._check_engine(micro_batch)
        self._rollout = self._rollout_trace(micro_batch) if self.cfg.routing_control == "replay_rollout" else None
        if self._mode == "old":
            self._hooks = contextlib.ExitStack()
            self._rec = self._hooks.enter_context(self.step.capture(None, chunks="sequence", rollout=self._rollout))
            return
        if self._rollout is not None:  # R3: every update routes to the rollout's experts and gathers at them
            self._hooks = contextlib.ExitStack()
            old = OldTrace(RouterTrace(self._rollout.topk_idx, self._rollout.logp), self._rollout)
            self._rec = self._hooks.enter_context(self.step.forward(old, None))
            return
        if OLD_IDX not in micro_batch:
            self._mode = None
            raise KeyError(
                f"{NAMESPACE}: the update's batch has no {OLD_IDX!r}: the old-log-prob pass did not run on the "
                "actor (rollout-correction bypass mode, or the v0 trainer, which drops extra outputs); RSPO "
                "needs the old pass"
            )
        stored = self._old_per_forward_token(micro_batch, micro_batch[OLD_IDX])  # (B, S, L, K)
        trace = RouterTrace(stored, stored.new_zeros(stored.shape, dtype=torch.float32))  # gather reads topk_idx
        self._hooks = contextlib.ExitStack()
        self._rec = self._hooks.enter_context(self.step.forward(OldTrace(trace), None))

    def _rollout_trace(self, micro_batch: Any) -> RouterTrace:
        """The rollout's experts (verl's ``routed_experts``, nested like ``input_ids``) as a replay trace of the
        forward's tokens. Rows the rollout did not record (verl stores zeros: the last response token, padding)
        keep the router's own experts; with top-1 routing every row counts as recorded."""
        if ROUTED not in micro_batch:
            raise KeyError(
                f"{NAMESPACE}.routing_control=replay_rollout: the batch has no {ROUTED!r}; set "
                "actor_rollout_ref.rollout.enable_rollout_routing_replay=true so the rollout returns the experts"
            )
        idx = self._old_per_forward_token(micro_batch, micro_batch[ROUTED]).long()  # (B, S, L, k)
        r = self.step.routers
        if idx.shape[2:] != (r.num_layers, r.model_top_k):
            raise ValueError(
                f"{ROUTED} has {tuple(idx.shape[2:])} (layers, top-k); the model routes "
                f"({r.num_layers}, {r.model_top_k}) per token"
            )
        if idx.numel() and (idx.min() < 0 or idx.max() >= r.num_experts):
            raise ValueError(f"{ROUTED} holds expert indices outside 0..{r.num_experts - 1}")
        known = (idx != 0).any(-1).any(-1) if r.model_top_k > 1 else torch.ones(idx.shape[:2], dtype=torch.bool)
        idx = idx.to(r.idx_dtype)
        return RouterTrace(idx, idx.new_zeros((*idx.shape[:-1], 0), dtype=torch.float32), known=known.to(idx.device))

    def _old_per_forward_token(self, micro_batch: Any, old: Tensor) -> Tensor:
        """The old experts laid out as the forward's tokens ``(B, S, L, K)``: packed (B = 1, plus the tail
        pad) or padded."""
        import verl.utils.tensordict_utils as tu

        if not old.is_nested:
            raise TypeError(
                f"{OLD_IDX} must be a nested (jagged) tensor as the old pass wrote it, got {tuple(old.shape)}"
            )
        ids = micro_batch["input_ids"]
        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            vals = old.values()  # (nnz, L, K)
            pad = self.engine._get_packed_pad_size(vals.shape[0]) if hasattr(self.engine, "_get_packed_pad_size") else 0
            if pad:
                vals = torch.cat([vals, vals.new_zeros(pad, *vals.shape[1:])])
            return vals[None]
        lens = ids.offsets().diff()
        return torch.nested.to_padded_tensor(old, 0, output_size=(len(lens), int(lens.max()), *old.values().shape[1:]))

    def after_abandoned(self) -> None:
        """A forward that failed or never reached ``prepare_model_outputs``: unwind the open context as on
        an error (its hooks are removed, no record is assembled)."""
        if self._hooks is not None:
            hooks, self._hooks, self._mode, self._rec = self._hooks, None, None, None
            err = RuntimeError("rspo: forward abandoned")
            hooks.__exit__(type(err), err, None)

    def after(self, output_args: dict, micro_batch: Any, model_output: dict) -> None:
        """Disarm the hooks and add the router tensors to ``model_output`` (jagged, full sequence)."""
        import verl.utils.tensordict_utils as tu

        mode, hooks, self._mode, self._hooks = self._mode, self._hooks, None, None
        if mode is None:
            return
        hooks.close()  # removes the hooks and assembles the record (an error if a layer was not seen once)
        trace = self._rec.trace
        self._rec = None
        tensors = (
            {OLD_IDX: trace.topk_idx, OLD_LOGP: trace.logp}
            if mode == "old"
            else {CUR_IDX: trace.topk_idx, CUR_LOGP: trace.logp}
        )
        if mode == "old" and self._rollout is not None:  # R3: "old" experts are the rollout's (docs/r3.md)
            tensors = {OLD_IDX: self._rollout.topk_idx, OLD_LOGP: trace.logp, OWN_IDX: trace.topk_idx}
        b, s = trace.topk_idx.shape[:2]
        offsets = micro_batch["input_ids"].offsets()
        packed = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        lens = offsets.diff()
        for name, x in tensors.items():
            x = x.reshape(b * s, *x.shape[2:])  # (B*S, L, K)
            if packed:
                x = self.engine._gather_and_unpad_packed(x, output_args.get("pad_size", 0))
            else:  # padded rows -> the valid tokens of each row, packed
                x = x[(torch.arange(s, device=lens.device)[None] < lens[:, None]).reshape(-1)]
            model_output[name] = torch.nested.nested_tensor_from_jagged(x, offsets)


def install_capture(engine: Any, cfg: VerlRSPOConfig) -> EngineRouterCapture:
    """Wrap this engine's ``prepare_model_inputs`` / ``prepare_model_outputs`` (the instance, not the class)."""
    if getattr(engine, "_rspo_capture", None) is not None:
        raise RuntimeError(f"{NAMESPACE}: router capture is already installed on this engine")
    cap = EngineRouterCapture(engine, cfg)
    inputs, outputs = engine.prepare_model_inputs, engine.prepare_model_outputs

    @functools.wraps(inputs)
    def prepare_model_inputs(micro_batch):
        out = inputs(micro_batch=micro_batch)
        cap.before(micro_batch)
        return out

    @functools.wraps(outputs)
    def prepare_model_outputs(output, output_args, micro_batch, logits_processor_func):
        try:
            model_output = outputs(
                output=output,
                output_args=output_args,
                micro_batch=micro_batch,
                logits_processor_func=logits_processor_func,
            )
        except BaseException:
            cap.after_abandoned()
            raise
        cap.after(output_args, micro_batch, model_output)
        return model_output

    engine.prepare_model_inputs, engine.prepare_model_outputs = prepare_model_inputs, prepare_model_outputs
    engine._rspo_capture = cap
    return cap


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------
def _global_scale(loss: Tensor, mask: Tensor, loss_agg: str | None, info: dict) -> tuple[Tensor, bool]:
    """Our micro-batch mean -> verl's global normalisation: sum / (global tokens or sequences) * dp_size
    (``info``: verl's global batch info). Returns the loss and whether it is a partial sum (to be summed
    over micro-batches and ranks); without global counts (one process) the micro-batch mean, as agg_loss."""
    dp = int(info["dp_size"] or 1)
    token_level_mean = loss_agg == "token-mean"
    total = info["batch_num_tokens"] if token_level_mean else info["global_batch_size"]
    if total is None:
        if dp > 1:
            raise ValueError(
                f"{'batch_num_tokens' if token_level_mean else 'global_batch_size'} is required when "
                "dp_size > 1 (verl's agg_loss rule)"
            )
        return loss, False
    return loss * aggregation_count(mask, loss_agg) / total * dp, True


DUMP_ENV = "RSPO_VERL_DUMP_DIR"
"""Debugging aid: with this environment variable set to a directory, every call of :func:`rspo_ppo_loss`
saves its inputs and results there (``loss-r<rank>-<n>.pt``, ``torch.load``-able dicts of CPU tensors), so
a logged loss can be recomputed outside verl. The CPU end-to-end tests use it."""
_dump_calls = 0


def _dump_loss_inputs(directory: str, **record: Any) -> None:
    global _dump_calls
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    record = {k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v for k, v in record.items()}
    path = os.path.join(directory, f"loss-r{rank}-{_dump_calls:05d}.pt")
    os.makedirs(directory, exist_ok=True)
    torch.save({**record, "rank": rank, "call": _dump_calls}, path)
    _dump_calls += 1


def rspo_ppo_loss(
    config: Any,
    model_output: dict,
    data: Any,
    dp_group: Any = None,
    *,
    rspo: VerlRSPOConfig,
    capture: EngineRouterCapture | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """verl's loss-function contract (``ppo_loss``'s signature, ``rspo`` and the engine's ``capture`` bound by
    partial): the objective with the router shift, verl's rollout weights, entropy bonus and KL loss,
    normalised as ``agg_loss``. Gamma and the router metrics come from :mod:`rspo.routing.step`, as in
    ``rspo train`` (``router/load_max_ratio`` needs the capture's model; the gamma histogram is not logged:
    verl's metrics are numbers).

    Departure from verl's ``geo_mean``: that loss is a mean over the micro-batch's rows, and the engine sums
    micro-batch losses, so it grows with the number of micro-batches; gmpo/rspo here are means over the global
    mini-batch (``global_batch_size``), like verl's sequence-mean modes. Equal on one micro-batch, one rank.
    """
    from verl.trainer.ppo.core_algos import agg_loss, kl_penalty
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    log_prob = no_padding_2_padding(model_output["log_probs"], data)  # (B, T)
    entropy = model_output.get("entropy")
    if entropy is not None:
        entropy = no_padding_2_padding(entropy, data)
    info = {
        "dp_size": data["dp_size"],
        "batch_num_tokens": data["batch_num_tokens"],
        "global_batch_size": data["global_batch_size"],
        "loss_scale_factor": config.loss_scale_factor,
    }
    config.global_batch_info.update(info)
    wanted = ["response_mask", "old_log_probs", "advantages"]
    wanted += [k for k in ("rollout_is_weights", "ref_log_prob") if k in data]
    small = data.select(*wanted).to_padded_tensor()
    mask = small["response_mask"].to(log_prob.dtype)
    opts = options(config, rspo)
    hp = opts.objective_hparams(norm_length=float(mask.shape[-1]))  # agg_loss's default horizon
    metrics: dict[str, Any] = {}
    gamma = old = cur = None
    pad = functools.partial(no_padding_2_padding, data=data)  # (B, T, L, K) at the response tokens
    if OWN_IDX in data:  # R3, with or without router shift: the old router's own top-K against the rollout's
        metrics.update(routing_agreement(pad(data[OLD_IDX]), pad(data[OWN_IDX]), mask, "router/rollout_"))
    if rspo.router_shift:
        for key, src in ((OLD_LOGP, data), (CUR_LOGP, model_output)):
            if key not in src:
                where = "batch" if src is data else "model output"
                raise KeyError(
                    f"{NAMESPACE}: no {key!r} in the {where}: the router capture is not installed on "
                    "this engine, or the old pass did not run"
                )
        old = OldTrace(RouterTrace(pad(data[OLD_IDX]), pad(data[OLD_LOGP])))
        cur = RouterTrace(pad(model_output[CUR_IDX]), pad(model_output[CUR_LOGP]))
        routing = opts.routing_options(log=True)
        gamma = router_gamma(routing, old, cur).to(log_prob.dtype)
        experts = capture.step.routers.num_experts if capture is not None else None
        metrics.update(router_metrics(routing, old, cur, gamma, mask, experts, histogram=False))
        metrics["router/tokens"] = int((mask > 0).sum())
    weights = small.get("rollout_is_weights", None)
    loss, pg = compute_policy_loss(
        rspo.objective,
        log_prob,
        small["old_log_probs"].to(log_prob.dtype),
        small["advantages"].to(log_prob.dtype),
        mask,
        router_shift=gamma,
        rollout_weights=weights,
        rollout_weights_reduce=(rspo.rollout_weights_reduce or "geometric")
        if weights is not None and get_objective(rspo.objective).level == "sequence"
        else None,
        **hp,
    )
    policy_loss, partial_sum = _global_scale(loss, mask, hp.get("loss_agg"), info)
    if os.environ.get(DUMP_ENV):
        _dump_loss_inputs(
            os.environ[DUMP_ENV],
            objective=rspo.objective,
            router_shift_options=dataclasses.asdict(rspo.shift),
            hparams=hp,
            info=info,
            log_prob=log_prob,
            old_log_probs=small["old_log_probs"],
            advantages=small["advantages"],
            mask=mask,
            gamma=gamma,
            old_router_idx=old.trace.topk_idx if old is not None else None,
            old_router_logp=old.trace.logp if old is not None else None,
            cur_router_logp=cur.logp if cur is not None else None,
            rollout_weights=weights,
            loss=loss,
            policy_loss=policy_loss,
            partial_sum=partial_sum,
        )
    agg = AggregationType.SUM if partial_sum else AggregationType.MEAN
    metrics.update({k if k.startswith("router/") else f"pg/{k}": v for k, v in pg.items()})  # router/clip_frac
    metrics["pg_loss"] = Metric(value=policy_loss.detach(), aggregation=agg)
    if entropy is not None and config.entropy_coeff != 0:
        ent = agg_loss(loss_mat=entropy, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **config.global_batch_info)
        policy_loss = policy_loss - config.entropy_coeff * ent
        metrics["entropy_loss"] = Metric(value=ent.detach(), aggregation=agg)
    if config.use_kl_loss:
        if "ref_log_prob" not in small:
            raise KeyError("actor_rollout_ref.actor.use_kl_loss=true but the batch has no ref_log_prob")
        kld = kl_penalty(logprob=log_prob, ref_logprob=small["ref_log_prob"], kl_penalty=config.kl_loss_type)
        kl = agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **config.global_batch_info)
        policy_loss = policy_loss + kl * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl.detach(), aggregation=agg)
    return policy_loss, metrics


# ---------------------------------------------------------------------------------------------------------
# Wiring into verl's actor worker
# ---------------------------------------------------------------------------------------------------------
def after_init_model(worker: Any) -> VerlRSPOConfig | None:
    """What the wrapped ``ActorRolloutRefWorker.init_model`` does after verl's own: with an
    ``actor_rollout_ref.rspo`` section, install the router capture on the actor's engine and our loss."""
    node = worker.config.get("rspo", None) if hasattr(worker.config, "get") else None
    cfg = VerlRSPOConfig.from_verl(node)
    if cfg is None or getattr(worker, "actor", None) is None:
        return None
    loss_fn = worker.loss_fn
    actor_config = getattr(loss_fn, "keywords", {}).get("config")
    if actor_config is None:
        raise TypeError(
            f"{NAMESPACE}: the actor's loss is not verl's partial(ppo_loss, config=...) "
            f"({loss_fn!r}); distillation and custom losses cannot be combined with it"
        )
    if actor_config.strategy not in ("fsdp", "fsdp2"):
        raise ValueError(
            f"actor_rollout_ref.actor.strategy={actor_config.strategy!r}: {NAMESPACE} supports the "
            "FSDP engine (fsdp, fsdp2)"
        )
    options(actor_config, cfg)  # config errors now, not at the first update
    if cfg.routing_control == "replay_rollout":
        rollout = worker.config.get("rollout", None) if hasattr(worker.config, "get") else None
        if not (rollout is not None and rollout.get("enable_rollout_routing_replay", False)):
            raise ValueError(
                f"{NAMESPACE}.routing_control=replay_rollout needs the rollout's experts in the batch: set "
                "actor_rollout_ref.rollout.enable_rollout_routing_replay=true (vLLM/SGLang then return them)"
            )
    needs_capture = cfg.router_shift or cfg.routing_control != "none"
    cap = install_capture(worker.actor.engine, cfg) if needs_capture else None
    worker.loss_fn = functools.partial(rspo_ppo_loss, config=actor_config, rspo=cfg, capture=cap)
    worker.actor.set_loss_fn(worker.loss_fn)
    return cfg


def patch_actor_worker(cls: type) -> None:
    """Wrap ``cls.init_model`` once (verl's dispatch attributes are kept by ``functools.wraps``)."""
    if getattr(cls.init_model, "_rspo_patched", False):
        return
    original = cls.init_model

    @functools.wraps(original)
    def init_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        after_init_model(self)
        return out

    init_model._rspo_patched = True
    cls.init_model = init_model


LEGACY_TRAINER_ERROR = (
    f"{NAMESPACE}: the rspo plugin runs in verl's v1 trainer only (trainer.use_v1=true, main_ppo's default). "
    "The legacy RayPPOTrainer (trainer.use_v1=false, and the trainers built on it) does not carry the old "
    "pass's router record to the update, so gamma could not be measured"
)


def reject_legacy_trainer(cls: type) -> None:
    """Wrap ``cls.__init__`` (verl's legacy ``RayPPOTrainer``) to stop, before any worker starts, a run whose
    config has the ``actor_rollout_ref.rspo`` section."""
    if getattr(cls.__init__, "_rspo_patched", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        if config.get("actor_rollout_ref", {}).get("rspo") is not None:
            raise ConfigError(LEGACY_TRAINER_ERROR)
        original(self, config, *args, **kwargs)

    __init__._rspo_patched = True
    cls.__init__ = __init__


VERL_INTERNALS = {
    "verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead.prepare_model_inputs": ("self", "micro_batch"),
    "verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead.prepare_model_outputs": (
        "self",
        "output",
        "output_args",
        "micro_batch",
        "logits_processor_func",
    ),
    "verl.workers.engine.fsdp.transformer_impl.FSDPEngine._gather_and_unpad_packed": ("self", "tensor", "pad_size"),
    "verl.workers.utils.losses.ppo_loss": ("config", "model_output", "data", "dp_group"),
    "verl.workers.utils.padding.no_padding_2_padding": ("tensor", "data"),
    "verl.trainer.ppo.core_algos.agg_loss": (
        "loss_mat",
        "loss_mask",
        "loss_agg_mode",
        "dp_size",
        "batch_num_tokens",
        "global_batch_size",
        "loss_scale_factor",
    ),
}
"""The verl functions we wrap or call, with the parameters we rely on."""


def check_verl_internals() -> None:
    """Fail naming the verl function whose signature moved (and the supported range)."""
    import importlib
    import inspect

    import verl

    for path, params in VERL_INTERNALS.items():
        parts = path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            raise RuntimeError(
                f"verl {verl.__version__}: {path} is gone; rspo's verl plugin supports verl{SUPPORTED_VERL}"
            ) from None
        have = tuple(inspect.signature(obj).parameters)
        if have[: len(params)] != params:
            raise RuntimeError(
                f"verl {verl.__version__}: {path}{have} moved from {params}; rspo's verl plugin "
                f"supports verl{SUPPORTED_VERL}"
            )


__all__ = [
    "NAMESPACE",
    "SUPPORTED_VERL",
    "EngineRouterCapture",
    "VerlRSPOConfig",
    "after_init_model",
    "check_verl_internals",
    "install_capture",
    "objective_hparams",
    "patch_actor_worker",
    "rspo_ppo_loss",
]
