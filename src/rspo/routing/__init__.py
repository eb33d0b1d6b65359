"""Router-shift math, router capture and routing control for transformers MoE families."""

from rspo.routing.shift import (
    ExpertAgg,
    LayerAgg,
    non_shifted_ratio,
    router_clip_mask,
    router_shift_log_ratio,
    router_shift_ratio,
    router_shift_ratio_with_grad,
)

__all__ = [
    "ExpertAgg",
    "LayerAgg",
    "non_shifted_ratio",
    "router_clip_mask",
    "router_shift_log_ratio",
    "router_shift_ratio",
    "router_shift_ratio_with_grad",
]
