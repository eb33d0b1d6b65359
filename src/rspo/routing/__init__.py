"""Router-shift math, router capture and routing control for transformers MoE families."""

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

__all__ = [
    "FAMILIES",
    "GAMMA_EDGES",
    "ExpertAgg",
    "LayerAgg",
    "MoERouters",
    "ReplayMode",
    "RouterFamily",
    "RouterProb",
    "RouterTrace",
    "family_of",
    "gamma_histogram",
    "gamma_metrics",
    "histogram_quantile",
    "histogram_share_below",
    "index_dtype",
    "non_shifted_ratio",
    "router_clip_mask",
    "router_shift_log_ratio",
    "router_shift_ratio",
    "router_shift_ratio_with_grad",
]
