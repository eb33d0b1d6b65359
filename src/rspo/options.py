"""The objective and router-shift options, defined once for every engine.

``rspo train`` reads them from its YAML sections ``objective`` and ``router_shift`` (and ``routing.control``);
TRL's :class:`~rspo.integrations.trl.RSPOConfig` from flat fields (``router_shift_gamma_min``, TRL's own
``epsilon``, ...); the verl plugin from ``actor_rollout_ref.rspo.<key>`` (and verl's actor clip keys). Each
engine maps its names onto the dataclasses below and builds them with :func:`rspo.config.build`, so the
types, defaults, checks and help are the same everywhere, and an error names the option as the user wrote
it (:class:`Names`). An option an engine cannot apply is rejected there by name.

    opts = Options(ObjectiveOptions("rspo"), RouterShiftOptions(gamma_min=0.5))
    loss, metrics = compute_policy_loss(opts.objective.name, ..., **opts.objective_hparams(norm_length=1024))
    step = RoutingStep(model, opts.routing_options())
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rspo.errors import ConfigError, FieldError
from rspo.objectives import (
    LossAgg,
    RouterShiftForm,
    RouterShiftPlacement,
    check_hparams,
    get_objective,
    list_objectives,
)
from rspo.routing.families import RouterProb
from rspo.routing.shift import ExpertAgg, LayerAgg
from rspo.routing.step import RoutingControl, RoutingOptions


@dataclass
class ObjectiveOptions:
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
            raise FieldError("name", f"{self.name!r} is not an objective; valid: {', '.join(list_objectives())}")
        if self.norm_length is not None and not self.norm_length > 0:
            why = f"must be > 0 (or null for the response length limit), got {self.norm_length}"
            raise FieldError("norm_length", why)
        has_agg = "loss_agg" in get_objective(self.name).defaults
        for key in ("loss_agg", "norm_length"):
            if not has_agg and getattr(self, key) is not None:
                raise FieldError(key, f"does not apply to {self.name!r} (a sequence-level objective)")


@dataclass
class RouterShiftOptions:
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
            raise FieldError("gamma_min", f"must be in (0, 1], got {self.gamma_min}")
        if self.clip_threshold is not None and not 0 < self.clip_threshold <= 1:
            raise FieldError("clip_threshold", f"must be in (0, 1], got {self.clip_threshold}")
        if self.clip_drop and self.clip_threshold is None:
            raise FieldError("clip_drop", "needs clip_threshold")
        if self.top_k is not None and self.top_k < 1:
            raise FieldError("top_k", f"must be >= 1 (and <= the model's experts), got {self.top_k}")


LOSS_ONLY = ("placement", "form", "stop_gradient", "clip_threshold", "clip_drop")
"""Router-shift options that act only inside the loss: with router shift off, a changed one is an error (the
others also shape the gamma that is logged for diagnostics)."""


@dataclass(frozen=True)
class Names:
    """How an engine spells each option, for its error messages: ``objective[field]``, ``router_shift`` (a
    format with the option's name), ``enabled`` (router shift on or off) and ``control``."""

    objective: Mapping[str, str] = field(default_factory=lambda: {f: f"objective.{f}" for f in _OBJECTIVE_FIELDS})
    router_shift: str = "router_shift.{}"
    enabled: str = "router_shift.enabled"
    control: str = "routing.control"

    def shift(self, key: str) -> str:
        return self.enabled if key == "enabled" else self.router_shift.format(key)

    def hparam(self, key: str) -> str:
        """The option behind a hyperparameter of :func:`rspo.objectives.compute_policy_loss`."""
        if key in self.objective:
            return self.objective[key]
        rs = {
            "router_shift_placement": "placement",
            "router_shift_form": "form",
            "router_shift_grad": "stop_gradient",
            "router_clip_threshold": "clip_threshold",
            "router_clip_drop": "clip_drop",
        }
        return self.shift(rs[key]) if key in rs else key


_OBJECTIVE_FIELDS = [f.name for f in dataclasses.fields(ObjectiveOptions)]
TRAIN_NAMES = Names()
"""``rspo train``'s YAML keys."""


@dataclass
class Options:
    """The objective and router-shift options of a run, checked together (the router shift against the
    objective, the objective's hyperparameters), with the arguments the loss and the routing step take."""

    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    router_shift: RouterShiftOptions = field(default_factory=RouterShiftOptions)
    control: RoutingControl = "none"
    names: Names = field(default=TRAIN_NAMES, repr=False, compare=False)

    def __post_init__(self) -> None:
        o, rs, n = self.objective, self.router_shift, self.names
        use = get_objective(o.name).router_shift
        if rs.enabled is None:
            rs.enabled = use == "required"
        elif use == "required" and not rs.enabled:
            why = f"objective {o.name!r} needs router shift (use gmpo without it)"
            raise ConfigError(f"{n.shift('enabled')}=false: {why}")
        elif use == "none" and rs.enabled:
            raise ConfigError(
                f"{n.shift('enabled')}=true: objective {o.name!r} cannot use router shift (use rspo for gmpo + RS)"
            )
        if rs.form != "weight" and o.name != "rspo":
            raise ConfigError(f"{n.shift('form')} applies to the rspo objective only")
        if not rs.enabled:
            default = RouterShiftOptions()
            changed = [n.shift(k) for k in LOSS_ONLY if getattr(rs, k) != getattr(default, k)]
            if changed:
                raise ConfigError(
                    f"{', '.join(changed)} set but router shift is off for {o.name!r} (they act only "
                    f"inside the loss); set {n.shift('enabled')}=true or leave them"
                )
        try:  # the objective's own checks (clip ranges, aggregation), now rather than at the first update
            check_hparams(o.name, router_shift=bool(rs.enabled), **self.objective_hparams(norm_length=1.0))
        except ValueError as e:
            msg = re.sub(
                r"\b(" + "|".join(map(re.escape, self._hparam_keys())) + r")\b", lambda m: n.hparam(m.group(1)), str(e)
            )
            raise ConfigError(f"objective {o.name!r}: {msg}") from None

    @staticmethod
    def _hparam_keys() -> list[str]:
        return [
            "clip_low",
            "clip_high",
            "loss_agg",
            "norm_length",
            "dual_clip",
            "router_shift_placement",
            "router_shift_form",
            "router_shift_grad",
            "router_clip_threshold",
            "router_clip_drop",
        ]

    @property
    def shift(self) -> bool:
        """Whether the loss is weighted by gamma."""
        return bool(self.router_shift.enabled)

    def objective_hparams(self, norm_length: float | None = None) -> dict[str, Any]:
        """Keyword hyperparameters for :func:`rspo.objectives.compute_policy_loss` (None: the objective's
        default). ``norm_length`` fills Dr. GRPO's normaliser when the option leaves it None."""
        o, rs = self.objective, self.router_shift
        pairs = (
            ("clip_low", o.clip_low),
            ("clip_high", o.clip_high),
            ("loss_agg", o.loss_agg),
            ("dual_clip", o.dual_clip),
        )
        hp: dict[str, Any] = {k: v for k, v in pairs if v is not None}
        if o.loss_agg == "seq-mean-token-sum-norm":
            hp["norm_length"] = float(o.norm_length if o.norm_length is not None else norm_length)
        if rs.enabled:
            hp.update(
                router_shift_placement=rs.placement,
                router_shift_grad=not rs.stop_gradient,
                router_clip_threshold=rs.clip_threshold,
                router_clip_drop=rs.clip_drop,
            )
            if o.name == "rspo":
                hp["router_shift_form"] = rs.form
        return hp

    def routing_options(self, log: bool | None = None) -> RoutingOptions:
        """The routing step's options (``log``: capture router data for diagnostics even when nothing needs it;
        None = on for MoE models)."""
        rs = self.router_shift
        return RoutingOptions(
            shift=self.shift,
            expert_agg=rs.expert_agg,
            layer_agg=rs.layer_agg,
            gamma_min=rs.gamma_min,
            stop_gradient=rs.stop_gradient,
            top_k=rs.top_k,
            prob=rs.prob,
            control=self.control,
            log=log,
        )


def router_shift_fields() -> list[str]:
    """The router-shift option names, in order (every engine has one option per name)."""
    return [f.name for f in dataclasses.fields(RouterShiftOptions)]


__all__ = [
    "LOSS_ONLY",
    "TRAIN_NAMES",
    "Names",
    "ObjectiveOptions",
    "Options",
    "RouterShiftOptions",
    "router_shift_fields",
]
