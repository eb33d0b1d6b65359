"""Router-shift math: the per-token ratio gamma (paper Eq. 6) and routing-drift diagnostics.

All inputs are router log-probabilities of the experts the OLD policy activated (its top-K per
MoE layer), under the old and under the current router, shaped ``(B, T, L, K)``::

    d[l, k] = | log r_new(S_l[k]) - log r_old(S_l[k]) |      (probabilities clamped at eps)
    expert_agg='log_mean' (Eq. 6):        log g_l = -mean_k d[l, k]
    expert_agg='mean_exp' (paper snippet): g_l    =  mean_k exp(-d[l, k])     (>= log_mean)
    layer_agg='geo_mean'  (Eq. 6, 1/L):   log gamma = mean_l log g_l
    layer_agg='product'   (a verl fork):  log gamma = sum_l  log g_l
    gamma = max(exp(log gamma), gamma_min)

Inputs are checked: NaN raises :class:`~rspo.errors.NonFiniteError` (the trainer counts it like a
non-finite loss), a positive log-probability (+inf included) raises ``ValueError``; -inf (probability
0) is allowed and clamped at ``eps``. ``gamma_min`` must lie in (0, 1].
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, get_args

import torch

from rspo.errors import NonFiniteError

Tensor = torch.Tensor
ExpertAgg = Literal["log_mean", "mean_exp"]
LayerAgg = Literal["geo_mean", "product"]


def _validate(old: Tensor, new: Tensor, expert_agg: str, layer_agg: str, gamma_min: float, eps: float) -> None:
    for name, t in (("old_logp_topk", old), ("new_logp_topk", new)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor (B, T, L, K), got shape {tuple(t.shape)} {t.dtype}")
        with torch.no_grad():
            nan = int(torch.isnan(t).sum())
            if nan:
                raise NonFiniteError(f"{name} has {nan} NaN entries (a diverged router?): gamma is undefined there")
            pos = t > 0
            if bool(pos.any()):
                raise ValueError(
                    f"{name} has {int(pos.sum())} positive entries (max {t.max().item():.4g}): router "
                    f"log-probabilities must be <= 0 (probabilities <= 1)"
                )
    if old.shape != new.shape:
        raise ValueError(f"new_logp_topk has shape {tuple(new.shape)}, old_logp_topk {tuple(old.shape)}: must match")
    if old.dtype != new.dtype:
        raise ValueError(f"new_logp_topk has dtype {new.dtype}, old_logp_topk {old.dtype}: must match")
    if expert_agg not in get_args(ExpertAgg):
        raise ValueError(f"expert_agg={expert_agg!r}; valid values: {', '.join(get_args(ExpertAgg))}")
    if layer_agg not in get_args(LayerAgg):
        raise ValueError(f"layer_agg={layer_agg!r}; valid values: {', '.join(get_args(LayerAgg))}")
    if not (isinstance(gamma_min, (int, float)) and 0 < gamma_min <= 1):
        raise ValueError(f"gamma_min must be in (0, 1], got {gamma_min!r}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")


def router_shift_log_ratio(
    old_logp_topk: Tensor,
    new_logp_topk: Tensor,
    *,
    expert_agg: ExpertAgg = "log_mean",
    layer_agg: LayerAgg = "geo_mean",
    eps: float = 1e-8,
) -> Tensor:
    """log gamma before the floor, ``(B, T)``, differentiable w.r.t. ``new_logp_topk``."""
    _validate(old_logp_topk, new_logp_topk, expert_agg, layer_agg, 1.0, eps)
    log_eps = math.log(eps)
    d = (new_logp_topk.clamp(min=log_eps) - old_logp_topk.clamp(min=log_eps)).abs()  # (B, T, L, K)
    if expert_agg == "log_mean":
        log_g_layer = -d.mean(-1)  # (B, T, L)
    else:  # mean_exp: log(mean_k exp(-d))
        log_g_layer = torch.logsumexp(-d, dim=-1) - math.log(d.shape[-1])
    return log_g_layer.mean(-1) if layer_agg == "geo_mean" else log_g_layer.sum(-1)  # (B, T)


def router_shift_ratio_with_grad(
    old_logp_topk: Tensor,
    new_logp_topk: Tensor,
    *,
    expert_agg: ExpertAgg = "log_mean",
    layer_agg: LayerAgg = "geo_mean",
    gamma_min: float = 0.5,
    eps: float = 1e-8,
) -> Tensor:
    """ABLATION ONLY (paper §4.3, collapsed training): gamma *without* stop-gradient.

    Same value as :func:`router_shift_ratio`; gradients flow into ``new_logp_topk`` (the current
    router) except where the floor is active. Pass the result with ``router_shift_grad=True``.
    """
    _validate(old_logp_topk, new_logp_topk, expert_agg, layer_agg, gamma_min, eps)
    log_gamma = router_shift_log_ratio(
        old_logp_topk, new_logp_topk, expert_agg=expert_agg, layer_agg=layer_agg, eps=eps
    )
    return torch.exp(log_gamma).clamp(min=gamma_min)


def router_shift_ratio(
    old_logp_topk: Tensor,
    new_logp_topk: Tensor,
    *,
    expert_agg: ExpertAgg = "log_mean",
    layer_agg: LayerAgg = "geo_mean",
    gamma_min: float = 0.5,
    eps: float = 1e-8,
) -> Tensor:
    """The router-shift ratio gamma, ``(B, T)``, detached, in [gamma_min, 1] (paper Eq. 6).

    Args:
        old_logp_topk: ``(B, T, L, K)`` old router log-probs of the old top-K experts.
        new_logp_topk: ``(B, T, L, K)`` current router log-probs at the same experts.
        expert_agg: ``log_mean`` (Eq. 6, default) or ``mean_exp`` (the paper's snippet).
        layer_agg: ``geo_mean`` (Eq. 6's 1/L, default) or ``product`` (shrinks with depth).
        gamma_min: floor; the paper sweeps {0.2, 0.5, 0.8} and finds 0.5 ~ 0.8 > 0.2.
        eps: probabilities are clamped at ``eps`` before the log (as the snippet does).
    """
    with torch.no_grad():
        return router_shift_ratio_with_grad(
            old_logp_topk,
            new_logp_topk,
            expert_agg=expert_agg,
            layer_agg=layer_agg,
            gamma_min=gamma_min,
            eps=eps,
        )


def router_clip_mask(gamma: Tensor, response_mask: Tensor, threshold: float) -> Tensor:
    """The paper snippet's ``router_clip_mask``: response tokens with gamma < threshold, ``(B, T)`` bool."""
    if gamma.shape != response_mask.shape:
        raise ValueError(f"gamma has shape {tuple(gamma.shape)}, response_mask {tuple(response_mask.shape)}")
    return (gamma < threshold) & (response_mask > 0)


def gamma_metrics(
    gamma: Tensor, mask: Tensor, gamma_min: float | None = None, clip_threshold: float | None = None
) -> dict[str, float]:
    """Distribution of gamma over response tokens: ``router/gamma_{mean,p10,min}``, plus
    ``router/gamma_at_floor`` (share at ``gamma_min``) and ``router/clip_frac`` (share below
    ``clip_threshold``) when those are given. NaN (0 for shares) on an empty mask."""
    with torch.no_grad():
        g = gamma.detach()[mask > 0]
        n = g.numel()
        nan = float("nan")
        gd = g.double()
        out = {
            "router/gamma_mean": float(g.mean()) if n else nan,
            "router/gamma_p10": float(torch.quantile(gd, 0.1)) if n else nan,
            "router/gamma_min": float(g.min()) if n else nan,
        }
        if gamma_min is not None:
            # gamma_min is applied by max(); tokens at the floor equal it up to float rounding.
            floor = torch.tensor(gamma_min, dtype=g.dtype)
            out["router/gamma_at_floor"] = float((g <= floor).double().mean()) if n else 0.0
        if clip_threshold is not None:
            out["router/clip_frac"] = float((g < clip_threshold).double().mean()) if n else 0.0
    return out


GAMMA_THRESHOLDS = (0.99, 0.95, 0.9)
"""The tail shares :func:`gamma_tail_metrics` reports."""


def gamma_tail_metrics(gamma: Tensor, mask: Tensor) -> dict[str, float]:
    """The tail of gamma over response tokens: ``router/gamma_p1``, ``router/gamma_p50`` and the shares
    ``router/gamma_below_{0.99,0.95,0.9}``; empty on an empty mask."""
    g = gamma.detach()[mask > 0].double()
    if not g.numel():
        return {}
    out = {"router/gamma_p1": float(torch.quantile(g, 0.01)), "router/gamma_p50": float(torch.quantile(g, 0.5))}
    for thr in GAMMA_THRESHOLDS:
        out[f"router/gamma_below_{thr}"] = float((g < thr).double().mean())
    return out


GAMMA_EDGES = (
    1.0,
    0.99999,
    0.9999,
    0.999,
    0.995,
    0.99,
    0.98,
    0.97,
    0.96,
    0.95,
    0.94,
    0.93,
    0.92,
    0.9,
    0.88,
    0.85,
    0.8,
    0.75,
    0.7,
    0.6,
    0.5,
    0.0,
)
"""Bins of :func:`gamma_histogram`: bin 0 holds gamma == 1 exactly, bin i >= 1 holds
``GAMMA_EDGES[i] <= gamma < GAMMA_EDGES[i - 1]`` (so shares below 0.99, 0.95, 0.9 are exact sums)."""


def gamma_histogram(gamma: Tensor, mask: Tensor) -> list[int]:
    """Counts of response tokens per :data:`GAMMA_EDGES` bin: pooled over updates, an exact distribution
    up to the bin width (quantiles of quantiles would not be)."""
    with torch.no_grad():
        g = gamma.detach()[mask > 0].double()
        counts = [int((g >= 1.0).sum())]
        for hi, lo in itertools.pairwise(GAMMA_EDGES):
            counts.append(int(((g >= lo) & (g < hi)).sum()))
    return counts


def histogram_quantile(counts: list[int] | list[float], q: float) -> float:
    """The ``q`` quantile of a :func:`gamma_histogram` (linear within a bin); NaN if it is empty."""
    total = sum(counts)
    if not total:
        return float("nan")
    # ascending gamma: the lowest bin is the last one
    below = 0.0
    for i in range(len(counts) - 1, 0, -1):
        lo, hi = GAMMA_EDGES[i], GAMMA_EDGES[i - 1]
        if below + counts[i] >= q * total and counts[i]:
            return lo + (hi - lo) * (q * total - below) / counts[i]
        below += counts[i]
    return 1.0


def histogram_share_below(counts: list[int] | list[float], threshold: float) -> float:
    """Share of tokens with gamma < ``threshold`` (a value of :data:`GAMMA_EDGES`)."""
    if threshold not in GAMMA_EDGES[1:]:
        raise ValueError(f"threshold {threshold} is not a bin edge; edges: {GAMMA_EDGES}")
    total = sum(counts)
    k = GAMMA_EDGES.index(threshold)
    return sum(counts[k + 1 :]) / total if total else float("nan")


def non_shifted_ratio(old_topk_idx: Tensor, new_topk_idx: Tensor, mask: Tensor) -> float:
    """Share of response tokens whose top-K expert *set* is unchanged in every MoE layer.

    ``old_topk_idx``, ``new_topk_idx``: ``(B, T, L, K)`` integer expert indices (order within K
    is ignored); ``mask``: ``(B, T)``. Returns NaN for an empty mask.
    """
    if old_topk_idx.shape != new_topk_idx.shape:
        raise ValueError(
            f"new_topk_idx has shape {tuple(new_topk_idx.shape)}, old_topk_idx {tuple(old_topk_idx.shape)}"
        )
    if old_topk_idx.dim() != 4 or old_topk_idx.is_floating_point() or new_topk_idx.is_floating_point():
        raise ValueError("old_topk_idx and new_topk_idx must be integer tensors (B, T, L, K)")
    if tuple(mask.shape) != tuple(old_topk_idx.shape[:2]):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(old_topk_idx.shape[:2])}")
    same = (old_topk_idx.sort(-1).values == new_topk_idx.sort(-1).values).all(-1).all(-1)  # (B, T)
    sel = mask > 0
    n = int(sel.sum())
    return float(same[sel].double().mean()) if n else float("nan")
