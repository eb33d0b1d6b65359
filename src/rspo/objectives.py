"""Policy objectives for GRPO-family RL, as pure tensor functions behind one name registry.

Entry point (used by the trainer, the docs and the outside checks)::

    loss, metrics = compute_policy_loss(
        name, log_probs, old_log_probs, advantages, response_mask,
        router_shift=None, rollout_weights=None, **hparams)

Shapes: ``log_probs``, ``old_log_probs``, ``response_mask``: ``(B, T)``; ``advantages``:
``(B,)`` or ``(B, T)``; ``router_shift`` (gamma): ``(B, T)``; ``rollout_weights``: ``(B, T)``
or ``(B,)``. The loss is a scalar to *minimise*; ``metrics`` maps namespaced names to Python
floats.

Notation used in every docstring below (per token, ``m`` = response mask)::

    dl = logp - old_logp          w = exp(dl)           A = advantage
    g  = gamma (router-shift ratio, stop-gradient, in [gamma_min, 1])
    c  = rollout-correction weight (stop-gradient, >= 0): pi_old / pi_rollout, truncated or masked

Every objective function has the same signature ``fn(log_probs, old_log_probs, advantages,
response_mask, router_shift, **hp) -> ObjectiveTerms``: advantages arrive broadcast to
``(B, T)``, the mask as a float tensor, and ``hp`` holds exactly the objective's validated
hyperparameters (plus ``rollout_weights`` when given: ``(B, T)`` for token-level objectives,
``(B,)`` for sequence-level ones). Token aggregation (:func:`aggregate`) is separate from the
per-token terms. Metrics are computed once, in :func:`compute_policy_loss`, for every objective.

Rollout correction (decoupled PPO: the rollout engine's policy differs from the old policy the
ratio is taken against) multiplies the clipped loss by c: token objectives per token, sequence
objectives (gspo, gmpo, rspo) per sequence. Router shift and rollout correction compose: gamma
scales the ratio pi_theta / pi_old (how far the router moved since the old pass), c the
behaviour ratio pi_old / pi_rollout (how differently the engine sampled); neither sees the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch

from rspo.errors import NonFiniteError
from rspo.routing.shift import router_clip_mask

Tensor = torch.Tensor

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
RouterShiftPlacement = Literal["after_clip", "before_clip"]
RouterShiftForm = Literal["weight", "eq5_literal"]
RouterShiftUse = Literal["none", "optional", "required"]
Level = Literal["token", "sequence"]
WeightsReduce = Literal["geometric", "arithmetic"]

# Hyperparameters with a closed set of values: checked at call time, the error lists them.
_CHOICES: dict[str, tuple[str, ...]] = {
    "loss_agg": get_args(LossAgg),
    "router_shift_placement": get_args(RouterShiftPlacement),
    "router_shift_form": get_args(RouterShiftForm),
}

# Hyperparameters that only make sense when a router-shift tensor is passed.
ROUTER_SHIFT_HPARAMS: dict[str, Any] = {
    "router_shift_placement": "after_clip",
    "router_shift_grad": False,
    "router_clip_threshold": None,
    "router_clip_drop": False,
}


class ObjectiveTerms(NamedTuple):
    """What an objective function returns; metrics are derived from it uniformly.

    loss: scalar to minimise.
    clipped_low / clipped_high: ``(B, T)`` bool, tokens whose clip is *active* (the clipped
        branch is taken and the token's ratio gets no gradient through it): lower bound with
        A < 0, upper bound with A > 0. Sequence-level objectives broadcast per sequence.
    loss_mask: ``(B, T)`` float, the tokens that entered the loss (the response mask, minus
        tokens dropped by ``router_clip_drop``).
    """

    loss: Tensor
    clipped_low: Tensor
    clipped_high: Tensor
    loss_mask: Tensor


ObjectiveFn = Callable[..., ObjectiveTerms]


@dataclass(frozen=True)
class Objective:
    """A registered objective: its function, its hyperparameter defaults and router-shift use."""

    name: str
    fn: ObjectiveFn
    defaults: Mapping[str, Any]
    router_shift: RouterShiftUse
    summary: str
    paper: str
    level: Level = "token"
    """Where rollout-correction weights apply: each token's loss, or each sequence's."""

    def valid_hparams(self, with_router_shift: bool) -> dict[str, Any]:
        hp = dict(self.defaults)
        if with_router_shift:
            hp.update(ROUTER_SHIFT_HPARAMS)
        return hp


_REGISTRY: dict[str, Objective] = {}


def register_objective(
    name: str,
    *,
    defaults: Mapping[str, Any],
    router_shift: RouterShiftUse,
    summary: str,
    paper: str,
    level: Level = "token",
) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator: register ``fn`` under ``name`` (a duplicate name is an error). ``level`` says whether the
    objective's loss is per token (rollout weights multiply each token's loss) or per sequence."""

    def deco(fn: ObjectiveFn) -> ObjectiveFn:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is already registered")
        if level not in get_args(Level):
            raise ValueError(f"level={level!r}; valid: {', '.join(get_args(Level))}")
        _REGISTRY[name] = Objective(name, fn, dict(defaults), router_shift, summary, paper, level)
        return fn

    return deco


def list_objectives() -> list[str]:
    """Names of all registered objectives, in registration order."""
    return list(_REGISTRY)


def get_objective(name: str) -> Objective:
    """The registered objective ``name``; an unknown name raises with the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {', '.join(_REGISTRY)}") from None


# ----------------------------------------------------------------------------------------
# Masked reductions and loss aggregation
# ----------------------------------------------------------------------------------------


def masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask`` that is exactly 0 where the mask is 0, even if ``x`` is NaN or inf there (padding)."""
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over ``mask`` (all elements, or along ``dim``); 0 where the mask is empty.
    Values outside the mask never reach the result (NaN padding included)."""
    if dim is None:
        return masked(x, mask).sum() / mask.sum().clamp(min=1)
    return masked(x, mask).sum(dim) / mask.sum(dim).clamp(min=1)


def seq_mean(per_seq: Tensor, mask: Tensor) -> Tensor:
    """Mean of a ``(B,)`` per-sequence value over sequences with at least one masked-in token."""
    valid = (mask.sum(-1) > 0).to(per_seq.dtype)  # (B,)
    return masked(per_seq, valid).sum() / valid.sum().clamp(min=1)


def aggregation_count(mask: Tensor, loss_agg: LossAgg | None) -> Tensor:
    """The denominator a batch brings to its loss's mean: its response tokens under ``token-mean``, else its
    sequences with at least one response token (every sequence mean). A batch's loss scaled by this count over
    the count of the whole mini-batch sums, over batches, to the mini-batch's loss (engines that split it)."""
    m = mask > 0
    return m.sum() if loss_agg == "token-mean" else (m.sum(-1) > 0).sum()


def aggregate(loss_mat: Tensor, mask: Tensor, loss_agg: LossAgg, norm_length: float | None = None) -> Tensor:
    """Reduce a per-token loss ``(B, T)`` to a scalar.

    - ``token-mean``: sum_bt m*l / sum_bt m  (DAPO; every token weighs the same).
    - ``seq-mean-token-mean``: mean_b [ sum_t m*l / sum_t m ]  (GRPO paper, Eq. 1).
    - ``seq-mean-token-sum-norm``: mean_b [ sum_t m*l ] / norm_length  (Dr. GRPO: a constant
      normaliser, no length bias; ``norm_length`` is required, usually the max response length).

    Sequences with an empty mask are left out of sequence means (as in verl's ``agg_loss``).
    """
    if loss_agg == "token-mean":
        return masked_mean(loss_mat, mask)
    if loss_agg == "seq-mean-token-mean":
        return seq_mean(masked_mean(loss_mat, mask, dim=-1), mask)
    if loss_agg == "seq-mean-token-sum-norm":
        if norm_length is None:
            raise ValueError("loss_agg='seq-mean-token-sum-norm' needs norm_length (a constant, e.g. max length)")
        return seq_mean(masked(loss_mat, mask).sum(-1), mask) / norm_length
    raise ValueError(f"unknown loss_agg {loss_agg!r}; valid values: {', '.join(_CHOICES['loss_agg'])}")


def _seq_advantage(advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence advantage ``(B,)``: the masked token mean (equal to A_b when A is per sequence)."""
    return masked_mean(advantages, mask, dim=-1)


def _log_gamma(router_shift: Tensor | None) -> Tensor | None:
    return None if router_shift is None else torch.log(router_shift)


def _dual_clip(loss: Tensor, advantages: Tensor, c: float | None) -> Tensor:
    """Dual clip (Ye et al. 2020; verl's ``clip_ratio_c``, TRL's ``delta``): with A < 0 the loss is at most
    ``-A c``, so a token (or sequence) whose ratio ran far above 1 cannot dominate the update."""
    if c is None:
        return loss
    return torch.where(advantages < 0, torch.minimum(loss, -advantages * c), loss)


def _weighted(loss: Tensor, rollout_weights: Tensor | None) -> Tensor:
    return loss if rollout_weights is None else loss * rollout_weights


# ----------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------


@register_objective(
    "grpo",
    defaults={
        "clip_low": 0.2,
        "clip_high": 0.2,
        "loss_agg": "seq-mean-token-mean",
        "norm_length": None,
        "dual_clip": None,
    },
    router_shift="optional",
    summary="token-level PPO clip; DAPO clip-higher = clip_high 0.28; Dr. GRPO = seq-mean-token-sum-norm",
    paper="Shao et al. 2024 (DeepSeekMath, GRPO); Yu et al. 2025 (DAPO); Liu et al. 2025 (Dr. GRPO)",
)
def grpo(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    router_shift: Tensor | None,
    *,
    clip_low: float,
    clip_high: float,
    loss_agg: LossAgg,
    norm_length: float | None,
    dual_clip: float | None,
    router_shift_placement: RouterShiftPlacement = "after_clip",
    router_clip_mask: Tensor | None = None,
    rollout_weights: Tensor | None = None,
) -> ObjectiveTerms:
    """GRPO: token-level clipped surrogate.

    Formula (per token, to minimise)::

        l = max(-A w, -A clip(w, 1 - clip_low, 1 + clip_high))
        l = min(l, -A dual_clip)          if A < 0 and dual_clip is set (verl clip_ratio_c, TRL delta)
        loss = aggregate(c * l, m, loss_agg)       (c = rollout weight per token, 1 without)

    With router shift (the paper's "GRPO+RS", §4.3)::

        after_clip  (default):  l = g * max(-A w, -A clip(w))
        before_clip:            l = max(-A (w g), -A clip(w g))

    Shapes: all inputs ``(B, T)``. Detached: ``old_log_probs``, ``g`` and ``c``.
    Departures: none from the GRPO paper (dual clip off by default, unlike verl's ``vanilla`` with
    ``clip_ratio_c=3``); no clamp of ``dl`` (verl clamps to [-20, 20]).
    """
    log_gamma = _log_gamma(router_shift)
    log_ratio = log_probs - old_log_probs  # (B, T)
    if log_gamma is not None and router_shift_placement == "before_clip":
        log_ratio = log_ratio + log_gamma
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = _dual_clip(torch.maximum(loss_unclipped, loss_clipped), advantages, dual_clip)  # (B, T)
    if router_shift is not None and router_shift_placement == "after_clip":
        per_token = per_token * router_shift
    mask = response_mask if router_clip_mask is None else response_mask * router_clip_mask
    return ObjectiveTerms(
        loss=aggregate(_weighted(per_token, rollout_weights), mask, loss_agg, norm_length),
        clipped_low=(ratio < 1 - clip_low) & (advantages < 0),
        clipped_high=(ratio > 1 + clip_high) & (advantages > 0),
        loss_mask=mask,
    )


def _gspo_sequence_log_ratio(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    log_gamma: Tensor | None,
    placement: RouterShiftPlacement,
) -> tuple[Tensor, Tensor | None]:
    """(log s, log G): token-means of dl and of log g over the sequence, each ``(B,)``.

    With ``before_clip``, log G is folded into log s and None is returned for it.
    """
    log_s = masked_mean(log_probs - old_log_probs, mask, dim=-1)  # (B,)
    if log_gamma is None:
        return log_s, None
    log_g = masked_mean(log_gamma, mask, dim=-1)  # (B,) geometric mean of gamma
    if placement == "before_clip":
        return log_s + log_g, None
    return log_s, log_g


@register_objective(
    "gspo",
    defaults={"clip_low": 3e-4, "clip_high": 4e-4, "dual_clip": None},
    router_shift="optional",
    summary="sequence ratio s = exp(mean_t dl), sequence-level clip, sequence-mean loss",
    paper="Zheng et al. 2025 (GSPO, arXiv:2507.18071)",
    level="sequence",
)
def gspo(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    router_shift: Tensor | None,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    router_shift_placement: RouterShiftPlacement = "after_clip",
    router_clip_mask: Tensor | None = None,
    rollout_weights: Tensor | None = None,
) -> ObjectiveTerms:
    """GSPO: sequence-level ratio and clip.

    Formula (per sequence b, to minimise)::

        s_b  = exp( sum_t m dl / sum_t m )
        l_b  = max(-A_b s_b, -A_b clip(s_b, 1 - clip_low, 1 + clip_high))
        l_b  = min(l_b, -A_b dual_clip)     if A_b < 0 and dual_clip is set
        loss = mean_b c_b l_b               (c_b = rollout weight per sequence, 1 without)

    With router shift ("GSPO+RS"), G_b = exp(sum_t m log g / sum_t m), the geometric mean of
    gamma over the sequence::

        after_clip  (default):  l_b = G_b * max(-A_b s_b, -A_b clip(s_b))
        before_clip:            s_b <- s_b * G_b, then clip as above

    Shapes: inputs ``(B, T)``; A_b is the masked token mean of ``advantages`` (equal to the
    sequence advantage when it is per sequence). Detached: ``old_log_probs``, gamma.
    Departures: none from the GSPO paper. (verl's ``gspo`` is the GSPO-token form, our
    ``gspo_token``, and clamps log s at 10.)
    """
    mask = response_mask if router_clip_mask is None else response_mask * router_clip_mask
    log_s, log_g = _gspo_sequence_log_ratio(
        log_probs, old_log_probs, mask, _log_gamma(router_shift), router_shift_placement
    )
    adv = _seq_advantage(advantages, mask)  # (B,)
    s = torch.exp(log_s)  # (B,)
    per_seq = torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - clip_low, 1 + clip_high))
    per_seq = _dual_clip(per_seq, adv, dual_clip)
    if log_g is not None:
        per_seq = per_seq * torch.exp(log_g)
    low = ((s < 1 - clip_low) & (adv < 0))[:, None].expand_as(mask)
    high = ((s > 1 + clip_high) & (adv > 0))[:, None].expand_as(mask)
    return ObjectiveTerms(seq_mean(_weighted(per_seq, rollout_weights), mask), low, high, mask)


@register_objective(
    "gspo_token",
    defaults={
        "clip_low": 3e-4,
        "clip_high": 4e-4,
        "loss_agg": "seq-mean-token-mean",
        "norm_length": None,
        "dual_clip": None,
    },
    router_shift="optional",
    summary="GSPO-token: s_t = sg(s) * pi/sg(pi); equals gspo in value, and in gradient for per-sequence A",
    paper="Zheng et al. 2025 (GSPO, §4.3 GSPO-token)",
)
def gspo_token(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    router_shift: Tensor | None,
    *,
    clip_low: float,
    clip_high: float,
    loss_agg: LossAgg,
    norm_length: float | None,
    dual_clip: float | None,
    router_shift_placement: RouterShiftPlacement = "after_clip",
    router_clip_mask: Tensor | None = None,
    rollout_weights: Tensor | None = None,
) -> ObjectiveTerms:
    """GSPO-token: per-token advantages with the sequence ratio's value.

    Formula::

        s_bt = sg[s_b] * exp(logp_bt - sg[logp_bt])        (value s_b, gradient of logp_bt)
        l_bt = max(-A_bt s_bt, -A_bt clip(s_bt, 1 - clip_low, 1 + clip_high))
        l_bt = min(l_bt, -A_bt dual_clip)                   if A_bt < 0 and dual_clip is set
        loss = aggregate(c * l, m, loss_agg)                (default seq-mean-token-mean)

    Router shift as in ``gspo`` (G_b folded into sg[s_b] before clip, or multiplying l after).
    With the default aggregation and A constant per sequence, value and gradient equal ``gspo``.
    Shapes ``(B, T)``. Detached: ``old_log_probs``, gamma, and s_b as written.
    """
    mask = response_mask if router_clip_mask is None else response_mask * router_clip_mask
    log_s, log_g = _gspo_sequence_log_ratio(
        log_probs, old_log_probs, mask, _log_gamma(router_shift), router_shift_placement
    )
    log_s_token = log_probs - log_probs.detach() + log_s.detach()[:, None]  # (B, T)
    s = torch.exp(log_s_token)
    per_token = torch.maximum(-advantages * s, -advantages * torch.clamp(s, 1 - clip_low, 1 + clip_high))
    per_token = _dual_clip(per_token, advantages, dual_clip)
    if log_g is not None:
        per_token = per_token * torch.exp(log_g)[:, None]
    return ObjectiveTerms(
        loss=aggregate(_weighted(per_token, rollout_weights), mask, loss_agg, norm_length),
        clipped_low=(s < 1 - clip_low) & (advantages < 0),
        clipped_high=(s > 1 + clip_high) & (advantages > 0),
        loss_mask=mask,
    )


def _geometric_mean_terms(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    router_shift: Tensor | None,
    clip_low: float,
    clip_high: float,
    placement: RouterShiftPlacement,
    form: RouterShiftForm,
    router_clip_mask: Tensor | None,
    rollout_weights: Tensor | None,
) -> ObjectiveTerms:
    """Shared body of ``gmpo`` and ``rspo`` (see their docstrings)."""
    mask = response_mask if router_clip_mask is None else response_mask * router_clip_mask
    log_gamma = _log_gamma(router_shift)
    sign = torch.sign(advantages)  # (B, T)
    dl = log_probs - old_log_probs  # (B, T)
    if log_gamma is not None and placement == "before_clip":
        dl = dl + log_gamma
    dl_clamped = torch.clamp(dl, -clip_low, clip_high)
    # One-sided clip in log space: for A > 0 only the upper bound binds, for A < 0 the lower.
    dl_clipped = sign * torch.minimum(sign * dl, sign * dl_clamped)
    if log_gamma is not None and placement == "after_clip":
        dl_clipped = dl_clipped + (sign * log_gamma if form == "eq5_literal" else log_gamma)
    log_r = masked_mean(dl_clipped, mask, dim=-1)  # (B,) log of the geometric-mean ratio
    adv = _seq_advantage(advantages, mask)  # (B,)
    per_seq = -adv * torch.exp(log_r)
    return ObjectiveTerms(
        loss=seq_mean(_weighted(per_seq, rollout_weights), mask),
        clipped_low=(dl < -clip_low) & (advantages < 0),
        clipped_high=(dl > clip_high) & (advantages > 0),
        loss_mask=mask,
    )


@register_objective(
    "gmpo",
    defaults={"clip_low": 0.4, "clip_high": 0.4},
    router_shift="none",
    summary="one-sided token clip in log space (sign(A) rule), geometric mean over the sequence",
    paper="Zhao et al. 2025 (GMPO, arXiv:2507.20673)",
    level="sequence",
)
def gmpo(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    router_shift: Tensor | None,
    *,
    clip_low: float,
    clip_high: float,
    rollout_weights: Tensor | None = None,
) -> ObjectiveTerms:
    """GMPO: geometric mean of token ratios clipped one-sidedly in log space.

    Formula (s = sign(A_bt)), to minimise::

        dl_c  = s * min(s dl, s clamp(dl, -clip_low, clip_high))
        R_b   = exp( sum_t m dl_c / sum_t m )
        loss  = mean_b( -c_b A_b R_b )          (c_b = rollout weight per sequence, 1 without)

    The clip range in ratio space is (e^-clip_low, e^clip_high); GMPO's default 0.4.
    Shapes ``(B, T)``; A_b is the masked token mean of the advantages (as verl's ``geo_mean``),
    while s uses the per-token advantage. Detached: ``old_log_probs``.
    Departures: none from GMPO's reference code (callsys/GMPO, verl ``geo_mean``).
    Use ``rspo`` for GMPO with router shift.
    """
    return _geometric_mean_terms(
        log_probs,
        old_log_probs,
        advantages,
        response_mask,
        None,
        clip_low,
        clip_high,
        "after_clip",
        "weight",
        None,
        rollout_weights,
    )


@register_objective(
    "rspo",
    defaults={"clip_low": 0.4, "clip_high": 0.4, "router_shift_form": "weight"},
    router_shift="required",
    summary="GMPO with the router-shift ratio gamma folded into each token's log-ratio",
    paper="Zhang et al. 2026 (RSPO, ACL 2026), Eq. 5-6 and its PyTorch snippet",
    level="sequence",
)
def rspo(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    router_shift: Tensor | None,
    *,
    clip_low: float,
    clip_high: float,
    router_shift_form: RouterShiftForm,
    router_shift_placement: RouterShiftPlacement = "after_clip",
    router_clip_mask: Tensor | None = None,
    rollout_weights: Tensor | None = None,
) -> ObjectiveTerms:
    """RSPO: GMPO with the router-shift ratio g (stop-gradient) in each token's ratio.

    Formula (s = sign(A_bt)), to minimise::

        after_clip  (default; paper §3.2 text and snippet):
            dl_c = s * min(s dl, s clamp(dl, -clip_low, clip_high)) + log g
        before_clip (the ACL 2026 abstract, verl forks):
            dl_c = s * min(s dl', s clamp(dl', -clip_low, clip_high)),  dl' = dl + log g
        R_b  = exp( sum_t m dl_c / sum_t m )      (= GMPO ratio x geometric mean of g)
        loss = mean_b( -c_b A_b R_b )             (c_b = rollout weight per sequence, 1 without)

    ``router_shift_form='eq5_literal'`` reads paper Eq. 5 literally: the bracket
    (min[w^s, clip(w^s)] * g)^s adds ``s * log g``, which *up*-weights tokens with A < 0. It is
    a documented non-default reading (the snippet multiplies by g for both signs) and only
    exists after clipping.

    Shapes ``(B, T)``; gamma ``(B, T)`` in [gamma_min, 1]. Detached: ``old_log_probs`` and g
    (unless ``router_shift_grad=True``, the paper's §4.3 ablation that collapsed).
    """
    if router_shift_form == "eq5_literal" and router_shift_placement != "after_clip":
        raise ValueError(
            "router_shift_form='eq5_literal' is Eq. 5's after-clip bracket; "
            "it cannot be combined with router_shift_placement='before_clip'"
        )
    return _geometric_mean_terms(
        log_probs,
        old_log_probs,
        advantages,
        response_mask,
        router_shift,
        clip_low,
        clip_high,
        router_shift_placement,
        router_shift_form,
        router_clip_mask,
        rollout_weights,
    )


# ----------------------------------------------------------------------------------------
# The entry point: validation, dispatch, metrics
# ----------------------------------------------------------------------------------------


def _check_tensor(name: str, t: Any, shape: tuple[int, ...] | None, dtype: torch.dtype | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype} (the dtype of log_probs)")


def _resolve_hparams(obj: Objective, with_router_shift: bool, hparams: dict[str, Any]) -> dict[str, Any]:
    valid = obj.valid_hparams(with_router_shift)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        rs_only = [k for k in unknown if k in ROUTER_SHIFT_HPARAMS and obj.router_shift != "none"]
        if rs_only and not with_router_shift:
            raise ValueError(
                f"hyperparameter(s) {rs_only} of objective {obj.name!r} only apply when router_shift is given"
            )
        raise ValueError(f"unknown hyperparameter(s) {unknown} for objective {obj.name!r}; valid: {', '.join(valid)}")
    hp = {**valid, **hparams}
    for key, choices in _CHOICES.items():
        if key in hp and hp[key] not in choices:
            raise ValueError(f"{key}={hp[key]!r} is not valid for {obj.name!r}; valid values: {', '.join(choices)}")
    for key in ("clip_low", "clip_high"):
        v = hp[key]
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{key} must be a finite number >= 0, got {v!r}")
    if obj.name in ("grpo", "gspo", "gspo_token") and hp["clip_low"] >= 1:
        raise ValueError(f"clip_low must be < 1 for {obj.name!r} (the lower bound is 1 - clip_low)")
    c = hp.get("dual_clip")
    if c is not None and not (
        isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 1 + hp["clip_high"]
    ):
        raise ValueError(f"dual_clip must be a number > 1 + clip_high = {1 + hp['clip_high']:g} (or None), got {c!r}")
    if "loss_agg" in hp:
        needs_norm = hp["loss_agg"] == "seq-mean-token-sum-norm"
        nl = hp["norm_length"]
        if needs_norm and not (isinstance(nl, (int, float)) and math.isfinite(nl) and nl > 0):
            raise ValueError("loss_agg='seq-mean-token-sum-norm' needs norm_length > 0 (e.g. the max length)")
        if not needs_norm and hp["norm_length"] is not None:
            raise ValueError(f"norm_length is only used by loss_agg='seq-mean-token-sum-norm', not {hp['loss_agg']!r}")
    if with_router_shift:
        v = hp["router_clip_threshold"]
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1):
            raise ValueError(f"router_clip_threshold must be in (0, 1], got {v!r}")
        for key in ("router_shift_grad", "router_clip_drop"):
            if not isinstance(hp[key], bool):
                raise ValueError(f"{key} must be True or False, got {hp[key]!r}")
        if hp["router_clip_drop"] and hp["router_clip_threshold"] is None:
            raise ValueError("router_clip_drop=True needs router_clip_threshold")
    return hp


def check_hparams(name: str, *, router_shift: bool, **hparams: Any) -> dict[str, Any]:
    """Validate objective ``name``'s hyperparameters exactly as :func:`compute_policy_loss` will, without
    tensors (``router_shift``: whether a gamma tensor will be passed). Returns them with defaults filled
    in. Configs call this when they are built, so a bad value fails before a run writes anything."""
    obj = get_objective(name)
    if obj.router_shift == "none" and router_shift:
        raise ValueError(
            f"objective {name!r} does not use router_shift; use one of "
            f"{[n for n, o in _REGISTRY.items() if o.router_shift != 'none']} (e.g. 'rspo' = gmpo + router shift)"
        )
    if obj.router_shift == "required" and not router_shift:
        raise ValueError(f"objective {name!r} needs router_shift (gamma); without it use 'gmpo'")
    return _resolve_hparams(obj, router_shift, hparams)


def compute_policy_loss(
    name: str,
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    router_shift: Tensor | None = None,
    rollout_weights: Tensor | None = None,
    rollout_weights_reduce: WeightsReduce | None = None,
    **hparams: Any,
) -> tuple[Tensor, dict[str, float]]:
    """Compute objective ``name`` and its metrics.

    Args:
        name: a registered objective (see :func:`list_objectives`).
        log_probs: ``(B, T)`` current-policy log-probs of the sampled tokens (with grad).
        old_log_probs: ``(B, T)`` log-probs under the policy that computed the old pass.
        advantages: ``(B,)`` per sequence, or ``(B, T)`` per token.
        response_mask: ``(B, T)``, nonzero on response tokens (bool, int or float).
        router_shift: optional ``(B, T)`` gamma in (0, 1] from
            :func:`rspo.routing.router_shift_ratio`. Detached here unless
            ``router_shift_grad=True``. Passing it to an objective that cannot use it is an error.
        rollout_weights: optional rollout-correction weights, ``(B, T)`` per token or ``(B,)`` (or
            ``(B, 1)``) per sequence, finite and >= 0 on response tokens; always detached. The same
            meaning as verl's ``rollout_is_weights`` and TRL's ``importance_sampling_ratio`` (see
            :mod:`rspo.correction` for computing them). Token objectives (grpo, gspo_token) multiply each
            token's loss (a per-sequence weight applies to all its tokens); sequence objectives (gspo,
            gmpo, rspo) multiply each sequence's loss, and reduce per-token weights to one per sequence
            over the loss mask by ``rollout_weights_reduce``. The aggregation's denominators do not
            change (a weight of 0 removes a token's contribution, not its place: as verl and TRL).
        rollout_weights_reduce: for per-token weights with a sequence objective: ``'geometric'`` (the
            default: exp of the mean log weight, as verl's ``geo_mean`` loss; one zero weight zeroes the
            sequence) or ``'arithmetic'`` (the mean weight, what TRL's sequence-level losses do when its
            token-level ratio multiplies the broadcast sequence loss). An error in any other case.
        **hparams: the objective's hyperparameters (see ``get_objective(name).defaults``) and,
            with ``router_shift``: ``router_shift_placement`` ('after_clip' | 'before_clip'),
            ``router_shift_grad`` (ablation: let gradients flow into gamma), ``router_clip_threshold``
            (reports ``router/clip_frac``, the paper snippet's router_clip_mask) and
            ``router_clip_drop`` (also drop those tokens from the loss). The floor ``gamma_min`` is
            applied where gamma is computed (:mod:`rspo.routing`); the loss takes gamma as given.

    Returns:
        ``(loss, metrics)``: the scalar loss to minimise and a dict of floats:
        ``loss/policy``, ``clip_ratio/{low,high,region}_mean`` (share of response tokens whose
        clip is active), ``ratio/{mean,std,max,min}`` (raw token ratio w over the mask,
        population std), ``kl/approx`` (mean of the k3 estimator (w - 1) - dl of KL(old||new)),
        ``router/clip_frac`` (with ``router_clip_threshold``: the share of tokens with gamma below it),
        with rollout weights ``rollout/weight_mean`` and ``rollout/weight_zero_frac`` (over tokens, or
        sequences for sequence objectives). What the loss does not know (gamma's distribution, the
        routing) is :func:`rspo.routing.step.router_metrics`.
    """
    obj = get_objective(name)
    hp = check_hparams(name, router_shift=router_shift is not None, **hparams)

    _check_tensor("log_probs", log_probs, None, None)
    if log_probs.dim() != 2 or not log_probs.is_floating_point():
        raise ValueError(f"log_probs must be a 2-D float tensor (B, T), got {tuple(log_probs.shape)} {log_probs.dtype}")
    bt = tuple(log_probs.shape)
    _check_tensor("old_log_probs", old_log_probs, bt, log_probs.dtype)
    _check_tensor("response_mask", response_mask, bt, None)
    _check_tensor("advantages", advantages, None, log_probs.dtype)
    if advantages.dim() == 1 and advantages.shape[0] == bt[0]:
        advantages = advantages[:, None].expand(bt)
    elif tuple(advantages.shape) != bt:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({bt[0]},) or {bt}")
    for tname, t in (
        ("old_log_probs", old_log_probs),
        ("response_mask", response_mask),
        ("advantages", advantages),
    ):
        if t.device != log_probs.device:
            raise ValueError(f"{tname} is on {t.device}, log_probs on {log_probs.device}")
    mask = response_mask.to(log_probs.dtype)
    # Padding may hold anything (NaN, inf): select with the mask before any arithmetic, so neither the
    # loss nor its gradient can see it (multiplying by the mask would turn NaN * 0 into NaN).
    keep = mask != 0
    zero = torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)
    log_probs = torch.where(keep, log_probs, zero)
    old_log_probs = torch.where(keep, old_log_probs.detach(), zero)
    advantages = torch.where(keep, advantages, zero)

    gamma = None
    extra: dict[str, Any] = {}
    if router_shift is not None:
        _check_tensor("router_shift", router_shift, bt, log_probs.dtype)
        if router_shift.device != log_probs.device:
            raise ValueError(f"router_shift is on {router_shift.device}, log_probs on {log_probs.device}")
        gamma = router_shift if hp["router_shift_grad"] else router_shift.detach()
        gamma = torch.where(keep, gamma, torch.ones((), dtype=gamma.dtype, device=gamma.device))
        g_in = gamma.detach()[mask > 0]
        if bool(torch.isnan(g_in).any()):
            raise NonFiniteError(f"router_shift (gamma) is NaN at {int(torch.isnan(g_in).sum())} response tokens")
        if g_in.numel() and not bool(((g_in > 0) & (g_in <= 1)).all()):
            raise ValueError(
                f"router_shift (gamma) must lie in (0, 1] on response tokens; got min {g_in.min().item():.4g}, "
                f"max {g_in.max().item():.4g}"
            )
        extra["router_shift_placement"] = hp["router_shift_placement"]
        if hp["router_clip_drop"]:  # keep the tokens the snippet's router_clip_mask does not flag
            flagged = router_clip_mask(gamma.detach(), mask, hp["router_clip_threshold"])
            extra["router_clip_mask"] = (~flagged).to(mask.dtype)
    if rollout_weights is not None:
        loss_mask = mask if "router_clip_mask" not in extra else mask * extra["router_clip_mask"]
        extra["rollout_weights"] = _rollout_weights(obj, rollout_weights, loss_mask, rollout_weights_reduce)
    elif rollout_weights_reduce is not None:
        raise ValueError("rollout_weights_reduce is given without rollout_weights")
    fn_hp = {k: v for k, v in hp.items() if k not in ROUTER_SHIFT_HPARAMS}

    terms = obj.fn(log_probs, old_log_probs, advantages, mask, gamma, **fn_hp, **extra)
    metrics = _metrics(terms, log_probs, old_log_probs, mask, gamma, hp)
    if rollout_weights is not None:
        w = extra["rollout_weights"]
        sel = terms.loss_mask > 0 if obj.level == "token" else terms.loss_mask.sum(-1) > 0
        w = w.expand_as(terms.loss_mask)[sel] if obj.level == "token" else w[sel]
        metrics["rollout/weight_mean"] = float(w.mean()) if w.numel() else float("nan")
        metrics["rollout/weight_zero_frac"] = float((w == 0).double().mean()) if w.numel() else 0.0
    return terms.loss, metrics


def _rollout_weights(obj: Objective, w: Any, mask: Tensor, reduce: WeightsReduce | None) -> Tensor:
    """Rollout weights checked and detached, in the objective's form: ``(B, T)`` or ``(B, 1)`` for a token
    objective, ``(B,)`` for a sequence objective (per-token weights reduced over ``mask``)."""
    bt = tuple(mask.shape)
    _check_tensor("rollout_weights", w, None, mask.dtype)
    if w.device != mask.device:
        raise ValueError(f"rollout_weights is on {w.device}, log_probs on {mask.device}")
    shape = tuple(w.shape)
    if shape not in (bt, (bt[0],), (bt[0], 1)):
        raise ValueError(f"rollout_weights has shape {shape}, expected {bt} (per token) or ({bt[0]},) (per sequence)")
    w = w.detach()
    per_token = shape == bt
    if reduce is not None and not (per_token and obj.level == "sequence"):
        raise ValueError(
            f"rollout_weights_reduce applies to per-token weights with a sequence-level objective "
            f"(gspo, gmpo, rspo), not to {'per-token' if per_token else 'per-sequence'} weights with {obj.name!r}"
        )
    if reduce is not None and reduce not in get_args(WeightsReduce):
        raise ValueError(f"rollout_weights_reduce={reduce!r}; valid: {', '.join(get_args(WeightsReduce))}")
    keep = mask != 0 if per_token else mask.sum(-1, keepdim=shape != (bt[0],)) > 0
    vals = w[keep]
    if vals.numel() and not bool((torch.isfinite(vals) & (vals >= 0)).all()):
        bad = vals[~(torch.isfinite(vals) & (vals >= 0))]
        raise ValueError(
            f"rollout_weights must be finite and >= 0 on response tokens; got {bad[:3].tolist()} "
            f"({bad.numel()} such values)"
        )
    one = torch.ones((), dtype=w.dtype, device=w.device)
    w = torch.where(keep, w, one)  # padding: anything (NaN included) becomes a neutral 1
    if obj.level == "token":
        return w if per_token else w.reshape(bt[0], 1)
    if not per_token:
        return w.reshape(bt[0])
    if (reduce or "geometric") == "geometric":
        return torch.exp(masked_mean(torch.log(w), mask, dim=-1))  # a zero weight gives exp(-inf) = 0
    return masked_mean(w, mask, dim=-1)


@torch.no_grad()
def _metrics(
    terms: ObjectiveTerms,
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    gamma: Tensor | None,
    hp: Mapping[str, Any],
) -> dict[str, float]:
    sel = mask > 0
    dl = (log_probs.detach() - old_log_probs)[sel]
    w = torch.exp(dl)
    n = int(sel.sum())
    low = terms.clipped_low[sel].to(dl.dtype)
    high = terms.clipped_high[sel].to(dl.dtype)
    nan = float("nan")
    out = {
        "loss/policy": float(terms.loss.detach()),
        "clip_ratio/low_mean": float(low.mean()) if n else 0.0,
        "clip_ratio/high_mean": float(high.mean()) if n else 0.0,
        "clip_ratio/region_mean": float((low + high).mean()) if n else 0.0,
        "ratio/mean": float(w.mean()) if n else nan,
        "ratio/std": float(w.std(correction=0)) if n else nan,
        "ratio/max": float(w.max()) if n else nan,
        "ratio/min": float(w.min()) if n else nan,
        "kl/approx": float((w - 1 - dl).mean()) if n else 0.0,
    }
    if gamma is not None and hp["router_clip_threshold"] is not None:  # the loss's own option (router_clip_*)
        below = gamma.detach()[sel] < hp["router_clip_threshold"]
        out["router/clip_frac"] = float(below.double().mean()) if n else 0.0
    return out


__all__ = [
    "ROUTER_SHIFT_HPARAMS",
    "Level",
    "LossAgg",
    "Objective",
    "ObjectiveTerms",
    "RouterShiftForm",
    "RouterShiftPlacement",
    "WeightsReduce",
    "aggregate",
    "check_hparams",
    "compute_policy_loss",
    "get_objective",
    "list_objectives",
    "masked",
    "masked_mean",
    "register_objective",
    "seq_mean",
]
