"""Router-shift math, router capture and routing control for transformers MoE families, and the one routing
step (:class:`RoutingStep`, :func:`router_gamma`, :func:`router_metrics`) the trainer and every adapter call."""

from rspo.routing.capture import MoERouters, ReplayMode, RouterTrace, index_dtype
from rspo.routing.families import FAMILIES, RouterFamily, RouterProb, family_of
from rspo.routing.shift import (
    GAMMA_EDGES,
    ExpertAgg,
    LayerAgg,
    gamma_histogram,
    gamma_metrics,
    histogram_quantile,
    histogram_share_below,
    non_shifted_ratio,
    router_clip_mask,
    router_shift_log_ratio,
    router_shift_ratio,
    router_shift_ratio_with_grad,
)
from rspo.routing.step import (
    OldTrace,
    Routers,
    RoutingControl,
    RoutingOptions,
    RoutingStep,
    router_gamma,
    router_metrics,
)

__all__ = [
    "FAMILIES",
    "GAMMA_EDGES",
    "ExpertAgg",
    "LayerAgg",
    "MoERouters",
    "OldTrace",
    "ReplayMode",
    "RouterFamily",
    "RouterProb",
    "RouterTrace",
    "Routers",
    "RoutingControl",
    "RoutingOptions",
    "RoutingStep",
    "family_of",
    "gamma_histogram",
    "gamma_metrics",
    "histogram_quantile",
    "histogram_share_below",
    "index_dtype",
    "non_shifted_ratio",
    "router_clip_mask",
    "router_gamma",
    "router_metrics",
    "router_shift_log_ratio",
    "router_shift_ratio",
    "router_shift_ratio_with_grad",
]
