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
import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, get_args

import torch

from rspo.objectives import compute_policy_loss, get_objective, list_objectives
from rspo.routing.capture import MoERouters, RouterTrace
from rspo.routing.shift import (
    ExpertAgg,
    LayerAgg,
    gamma_metrics,
    gamma_tail_metrics,
    non_shifted_ratio,
    router_shift_ratio_with_grad,
)

Tensor = torch.Tensor
SUPPORTED_VERL = ">=0.9.1,<0.10"
"""The verl range the plugin is written and tested against (``check_verl_internals`` guards it)."""
NAMESPACE = "actor_rollout_ref.rspo"
OLD_IDX, OLD_LOGP = "rspo_old_topk_idx", "rspo_old_router_logp"  # old pass -> batch -> update
CUR_IDX, CUR_LOGP = "rspo_cur_topk_idx", "rspo_cur_router_logp"  # update's model_output -> loss


@dataclass
class VerlRSPOConfig:
    """``actor_rollout_ref.rspo``: the objective and the router-shift options (as ``rspo train``'s)."""

    objective: str = "rspo"
    """Registered objective: grpo, gspo, gspo_token, gmpo, rspo (``rspo objectives``)."""
    router_shift: bool | None = None
    """Weight each token's ratio by gamma; None = on for rspo (which requires it), off otherwise."""
    gamma_min: float = 0.5
    expert_agg: ExpertAgg = "log_mean"
    layer_agg: LayerAgg = "geo_mean"
    stop_gradient: bool = True
    top_k: int | None = None
    """Old experts per layer stored and used; None = the model's experts per token."""
    prob: str = "full"
    placement: str = "after_clip"
    rollout_weights_reduce: str | None = None
    """verl's per-token ``rollout_is_weights`` on a sequence objective: 'geometric' (None: verl's geo_mean)
    or 'arithmetic'."""

    def __post_init__(self) -> None:
        key = f"{NAMESPACE}."
        if self.objective not in list_objectives():
            raise ValueError(f"{key}objective={self.objective!r}; valid: {', '.join(list_objectives())}")
        mode = get_objective(self.objective).router_shift
        if self.router_shift is None:
            self.router_shift = mode == "required"
        if mode == "required" and not self.router_shift:
            raise ValueError(f"{key}router_shift=false: objective {self.objective!r} needs the router shift")
        if mode == "none" and self.router_shift:
            raise ValueError(f"{key}router_shift=true: objective {self.objective!r} does not take a router shift")
        for name, valid in (("expert_agg", get_args(ExpertAgg)), ("layer_agg", get_args(LayerAgg)),
                            ("prob", ("full", "topk_renorm")), ("placement", ("after_clip", "before_clip")),
                            ("rollout_weights_reduce", (None, "geometric", "arithmetic"))):  # fmt: skip
            if getattr(self, name) not in valid:
                raise ValueError(f"{key}{name}={getattr(self, name)!r}; valid: {', '.join(map(str, valid))}")
        if not 0.0 < self.gamma_min <= 1.0:
            raise ValueError(f"{key}gamma_min={self.gamma_min}: must lie in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"{key}top_k={self.top_k}: must be >= 1 (or null: the model's)")

    @classmethod
    def from_verl(cls, node: Mapping[str, Any] | None) -> VerlRSPOConfig | None:
        """The section as verl hands it to the worker (an OmegaConf node or a dict); None when absent.
        Unknown keys and wrong types are errors naming ``actor_rollout_ref.rspo.<key>``."""
        if node is None:
            return None
        try:
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        except ImportError:
            data = dict(node)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{NAMESPACE}.{unknown[0]}: unknown key; valid keys: {', '.join(known)}")
        for k, v in data.items():
            want = {"gamma_min": (float, int), "top_k": (int, type(None)), "stop_gradient": (bool,),
                    "router_shift": (bool, type(None))}.get(k, (str, type(None)))  # fmt: skip
            if not isinstance(v, want) or (isinstance(v, bool) and bool not in want):
                raise ValueError(f"{NAMESPACE}.{k}={v!r}: expected {' or '.join(t.__name__ for t in want)}")
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


def objective_hparams(actor: Any, cfg: VerlRSPOConfig) -> dict[str, Any]:
    """The objective's hyperparameters from verl's actor config (errors name the verl key)."""
    obj = get_objective(cfg.objective)
    loss_mode = actor.policy_loss.get("loss_mode", "vanilla") if actor.policy_loss is not None else "vanilla"
    if loss_mode != "vanilla":
        raise ValueError(f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode!r}: with {NAMESPACE} the "
                         f"objective is {NAMESPACE}.objective; leave loss_mode at vanilla")  # fmt: skip
    low = actor.clip_ratio_low if actor.clip_ratio_low is not None else actor.clip_ratio
    high = actor.clip_ratio_high if actor.clip_ratio_high is not None else actor.clip_ratio
    hp: dict[str, Any] = {"clip_low": low, "clip_high": high}
    if "dual_clip" in obj.defaults:
        hp["dual_clip"] = actor.clip_ratio_c
    elif actor.clip_ratio_c != 3.0:
        raise ValueError(f"actor_rollout_ref.actor.clip_ratio_c={actor.clip_ratio_c}: objective {cfg.objective!r} "
                         "has no dual clip (leave it at 3.0)")  # fmt: skip
    mode = actor.loss_agg_mode
    if "loss_agg" in obj.defaults:
        if mode not in _TOKEN_AGG:
            raise ValueError(f"actor_rollout_ref.actor.loss_agg_mode={mode!r}: {cfg.objective} takes "
                             f"{', '.join(_TOKEN_AGG)}")  # fmt: skip
        hp["loss_agg"] = mode
        if mode == "seq-mean-token-sum-norm":
            hp["norm_length"] = actor.loss_scale_factor  # None: filled with the response length per call
    elif mode != "token-mean":
        raise ValueError(f"actor_rollout_ref.actor.loss_agg_mode={mode!r}: {cfg.objective} is a sequence-level "
                         "objective (a mean over sequences); leave loss_agg_mode at token-mean")  # fmt: skip
    if cfg.router_shift:
        hp["router_shift_placement"] = cfg.placement
        hp["router_shift_grad"] = not cfg.stop_gradient
    return hp


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
        self._routers: MoERouters | None = None
        self._hooks: contextlib.ExitStack | None = None  # MoERouters' capture or gather, open for one forward
        self._rec: Any = None
        self._mode: str | None = None

    @property
    def routers(self) -> MoERouters:
        if self._routers is None:
            self._routers = MoERouters(self.engine.module, top_k=self.cfg.top_k, prob=self.cfg.prob)
        return self._routers

    def _check_engine(self, micro_batch: Any) -> None:
        import verl.utils.tensordict_utils as tu

        if getattr(self.engine, "use_ulysses_sp", False):
            raise NotImplementedError(f"{NAMESPACE}: Ulysses sequence parallelism is not supported (set "
                                      "ulysses_sequence_parallel_size=1)")  # fmt: skip
        if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
            raise NotImplementedError(f"{NAMESPACE}: use_fused_kernels is not supported (the router hooks need "
                                      "the model's plain forward)")  # fmt: skip

    def before(self, micro_batch: Any) -> None:
        """Arm the hooks for this micro-batch's forward: :meth:`MoERouters.capture` in the old pass,
        :meth:`MoERouters.gather` at the old experts in the update (its hooks skip checkpoint recomputation)."""
        import verl.utils.tensordict_utils as tu

        self.after_abandoned()
        calc_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
        if torch.is_grad_enabled():
            self._mode = "update"
        elif calc_entropy:
            self._mode = "old"
        else:
            return
        self._check_engine(micro_batch)
        r = self.routers
        if self._mode == "old":
            self._hooks = contextlib.ExitStack()
            self._rec = self._hooks.enter_context(r.capture(positions=None))
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
        self._rec = self._hooks.enter_context(r.gather(trace, keep_grad=not self.cfg.stop_gradient))

    def _old_per_forward_token(self, micro_batch: Any, old: Tensor) -> Tensor:
        """The old experts laid out as the forward's tokens ``(B, S, L, K)``: packed (B = 1, plus the tail
        pad) or padded."""
        import verl.utils.tensordict_utils as tu

        if not old.is_nested:
            raise TypeError(f"{OLD_IDX} must be a nested (jagged) tensor as the old pass wrote it, got "
                            f"{tuple(old.shape)}")  # fmt: skip
        ids = micro_batch["input_ids"]
        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            vals = old.values()  # (nnz, L, K)
            pad = self.engine._get_packed_pad_size(vals.shape[0]) if hasattr(self.engine, "_get_packed_pad_size") \
                else 0  # fmt: skip
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
        b, s = trace.topk_idx.shape[:2]
        idx, logp = (x.reshape(b * s, *x.shape[2:]) for x in (trace.topk_idx, trace.logp))  # (B*S, L, K)
        offsets = micro_batch["input_ids"].offsets()
        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            pad = output_args.get("pad_size", 0)
            idx, logp = (self.engine._gather_and_unpad_packed(x, pad) for x in (idx, logp))
        else:  # padded rows -> the valid tokens of each row, packed
            lens = offsets.diff()
            keep = (torch.arange(s, device=lens.device)[None] < lens[:, None]).reshape(-1)
            idx, logp = idx[keep], logp[keep]
        names = (OLD_IDX, OLD_LOGP) if mode == "old" else (CUR_IDX, CUR_LOGP)
        for name, x in zip(names, (idx, logp), strict=True):
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
            model_output = outputs(output=output, output_args=output_args, micro_batch=micro_batch,
                                   logits_processor_func=logits_processor_func)  # fmt: skip
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
def _global_scale(loss: Tensor, mask: Tensor, token_level_mean: bool, info: dict) -> tuple[Tensor, bool]:
    """Our micro-batch mean -> verl's global normalisation: sum / (global tokens or sequences) * dp_size
    (``info``: verl's global batch info). Returns the loss and whether it is a partial sum (to be summed
    over micro-batches and ranks); without global counts (one process) the micro-batch mean, as agg_loss."""
    dp = int(info["dp_size"] or 1)
    total = info["batch_num_tokens"] if token_level_mean else info["global_batch_size"]
    if total is None:
        if dp > 1:
            raise ValueError(f"{'batch_num_tokens' if token_level_mean else 'global_batch_size'} is required when "
                             "dp_size > 1 (verl's agg_loss rule)")  # fmt: skip
        return loss, False
    local = mask.sum() if token_level_mean else (mask.sum(-1) > 0).sum()
    return loss * local / total * dp, True


def rspo_ppo_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None, *,
                  rspo: VerlRSPOConfig) -> tuple[Tensor, dict[str, Any]]:  # fmt: skip
    """verl's loss-function contract (``ppo_loss``'s signature, ``rspo`` bound by partial): the objective
    with the router shift, verl's rollout weights, entropy bonus and KL loss, normalised as ``agg_loss``.

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
    info = {"dp_size": data["dp_size"], "batch_num_tokens": data["batch_num_tokens"],
            "global_batch_size": data["global_batch_size"], "loss_scale_factor": config.loss_scale_factor}  # fmt: skip
    config.global_batch_info.update(info)
    wanted = ["response_mask", "old_log_probs", "advantages"]
    wanted += [k for k in ("rollout_is_weights", "ref_log_prob") if k in data]
    small = data.select(*wanted).to_padded_tensor()
    mask = small["response_mask"].to(log_prob.dtype)
    hp = objective_hparams(config, rspo)
    if hp.get("loss_agg") == "seq-mean-token-sum-norm" and hp.get("norm_length") is None:
        hp["norm_length"] = float(mask.shape[-1])  # agg_loss's default horizon
    metrics: dict[str, Any] = {}
    gamma = None
    if rspo.router_shift:
        for key, src in ((OLD_LOGP, data), (CUR_LOGP, model_output)):
            if key not in src:
                where = "batch" if src is data else "model output"
                raise KeyError(f"{NAMESPACE}: no {key!r} in the {where}: the router capture is not installed on "
                               "this engine, or the old pass did not run")  # fmt: skip
        old_lp = no_padding_2_padding(data[OLD_LOGP], data)  # (B, T, L, K)
        cur_lp = no_padding_2_padding(model_output[CUR_LOGP], data)
        g = router_shift_ratio_with_grad(old_lp.to(cur_lp.dtype), cur_lp, expert_agg=rspo.expert_agg,
                                         layer_agg=rspo.layer_agg, gamma_min=rspo.gamma_min)  # fmt: skip
        gamma = (g if not rspo.stop_gradient else g.detach()).to(log_prob.dtype)
        old_idx = no_padding_2_padding(data[OLD_IDX], data)
        cur_idx = no_padding_2_padding(model_output[CUR_IDX], data)
        metrics.update(gamma_metrics(gamma, mask, rspo.gamma_min))
        metrics.update(gamma_tail_metrics(gamma, mask))
        metrics["router/non_shifted_ratio"] = non_shifted_ratio(old_idx, cur_idx, mask)
        metrics["router/tokens"] = int((mask > 0).sum())
    weights = small.get("rollout_is_weights", None)
    loss, pg = compute_policy_loss(
        rspo.objective, log_prob, small["old_log_probs"].to(log_prob.dtype), small["advantages"].to(log_prob.dtype),
        mask, router_shift=gamma, rollout_weights=weights,
        rollout_weights_reduce=(rspo.rollout_weights_reduce or "geometric")
        if weights is not None and get_objective(rspo.objective).level == "sequence" else None, **hp,
    )  # fmt: skip
    token_mean = hp.get("loss_agg") == "token-mean"
    policy_loss, partial_sum = _global_scale(loss, mask, token_mean, info)
    agg = AggregationType.SUM if partial_sum else AggregationType.MEAN
    metrics.update({f"pg/{k}": v for k, v in pg.items() if not k.startswith("router/")})
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
        raise TypeError(f"{NAMESPACE}: the actor's loss is not verl's partial(ppo_loss, config=...) "
                        f"({loss_fn!r}); distillation and custom losses cannot be combined with it")  # fmt: skip
    if actor_config.strategy not in ("fsdp", "fsdp2"):
        raise ValueError(f"actor_rollout_ref.actor.strategy={actor_config.strategy!r}: {NAMESPACE} supports the "
                         "FSDP engine (fsdp, fsdp2)")  # fmt: skip
    objective_hparams(actor_config, cfg)  # config errors now, not at the first update
    if cfg.router_shift:
        install_capture(worker.actor.engine, cfg)
    worker.loss_fn = functools.partial(rspo_ppo_loss, config=actor_config, rspo=cfg)
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


VERL_INTERNALS = {
    "verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead.prepare_model_inputs": ("self", "micro_batch"),
    "verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead.prepare_model_outputs":
        ("self", "output", "output_args", "micro_batch", "logits_processor_func"),
    "verl.workers.engine.fsdp.transformer_impl.FSDPEngine._gather_and_unpad_packed": ("self", "tensor", "pad_size"),
    "verl.workers.utils.losses.ppo_loss": ("config", "model_output", "data", "dp_group"),
    "verl.workers.utils.padding.no_padding_2_padding": ("tensor", "data"),
    "verl.trainer.ppo.core_algos.agg_loss": ("loss_mat", "loss_mask", "loss_agg_mode", "dp_size", "batch_num_tokens",
                                             "global_batch_size", "loss_scale_factor"),
}  # fmt: skip
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
            raise RuntimeError(f"verl {verl.__version__}: {path} is gone; rspo's verl plugin supports verl"
                               f"{SUPPORTED_VERL}") from None  # fmt: skip
        have = tuple(inspect.signature(obj).parameters)
        if have[: len(params)] != params:
            raise RuntimeError(f"verl {verl.__version__}: {path}{have} moved from {params}; rspo's verl plugin "
                               f"supports verl{SUPPORTED_VERL}")  # fmt: skip


__all__ = ["NAMESPACE", "SUPPORTED_VERL", "EngineRouterCapture", "VerlRSPOConfig", "after_init_model",
           "check_verl_internals", "install_capture", "objective_hparams", "patch_actor_worker",
           "rspo_ppo_loss"]  # fmt: skip
