"""One routing step for every engine: what to capture in the old pass, the replay mode, gamma with or
without gradient, and the router metrics. The trainer, the TRL adapter and later adapters call it in a
few lines each; the loss takes gamma as given.

    step = RoutingStep(model, options.routing_options())   # rspo.options: the run's options
    with step.capture(resp) as rec:                 # the no-grad old pass (old log-probs)
        old_logits = model(...)
    old = step.old_trace(rec.trace, resp)           # what the update needs, per row
    with step.forward(old[rows], resp) as cur:      # the training forward (replay stays on through
        logits = model(...)                         # backward: call step.end() after it)
    gamma = step.gamma(old[rows], cur.trace)        # (B, T), detached unless stop_gradient=False
    metrics = step.metrics(old[rows], cur.trace, gamma, mask)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from rspo.errors import ModelError
from rspo.routing.capture import MoERouters, RouterTrace
from rspo.routing.families import RouterProb, family_of, looks_moe
from rspo.routing.shift import (
    ExpertAgg,
    LayerAgg,
    gamma_histogram,
    gamma_metrics,
    gamma_tail_metrics,
    non_shifted_ratio,
    router_shift_ratio_with_grad,
)

Tensor = torch.Tensor
RoutingControl = Literal["none", "freeze", "replay_logits", "replay_indices"]


@dataclass(frozen=True)
class RoutingOptions:
    """The router options of a run (``rspo train``'s router_shift and routing sections, RSPOConfig's fields)."""

    shift: bool = False
    expert_agg: ExpertAgg = "log_mean"
    layer_agg: LayerAgg = "geo_mean"
    gamma_min: float = 0.5
    stop_gradient: bool = True
    top_k: int | None = None
    prob: RouterProb = "full"
    control: RoutingControl = "none"
    log: bool | None = None
    """Capture for diagnostics even when nothing needs it; None = on for MoE models, off for dense ones."""


@dataclass
class OldTrace:
    """The old pass's router record: at the response positions (for gamma and diagnostics), and at every
    position (``full``, only for routing replay)."""

    trace: RouterTrace
    full: RouterTrace | None = None

    def __getitem__(self, rows) -> OldTrace:
        return OldTrace(self.trace[rows], None if self.full is None else self.full[rows])


def is_moe(model: nn.Module) -> bool:
    try:
        family_of(model)
        return True
    except ModelError:
        return False


class RoutingStep:
    """The routing side of one RL update (see the module docstring). A dense model is accepted when
    nothing needs a router; asking it for router shift, a routing control or router logging is an error
    naming the model class."""

    def __init__(self, model: nn.Module, opts: RoutingOptions) -> None:
        self.opts = opts
        needs = opts.shift or opts.control != "none"
        if not is_moe(model):
            if needs or opts.log:
                if looks_moe(model):
                    family_of(model)  # an MoE of an unsupported family: its error names the supported ones
                what = "router shift" if opts.shift else f"routing control {opts.control!r}" if needs else "log_router"
                raise ModelError(f"{type(model).__name__} is a dense model (no MoE router): {what} needs an MoE model")
            self.routers = None
            return
        self.routers = MoERouters(model, top_k=opts.top_k, prob=opts.prob)
        if not (needs or opts.log is not False):
            self.routers = None
            return
        if opts.control == "freeze":
            self.routers.freeze()

    @property
    def active(self) -> bool:
        """Whether router data is captured at all."""
        return self.routers is not None

    @property
    def replay(self) -> bool:
        return self.opts.control in ("replay_logits", "replay_indices")

    @contextlib.contextmanager
    def capture(self, resp: slice | None, chunks: Literal["sequence", "batch"] = "batch") -> Iterator:
        """The old pass: records the old top-K experts and router log-probs at the response positions ``resp``
        (every position for replay, or with ``resp=None``)."""
        if self.routers is None:
            yield None
            return
        with self.routers.capture(positions=None if self.replay else resp, weights=self.replay, chunks=chunks) as rec:
            yield rec

    def old_trace(self, trace: RouterTrace | None, resp: slice) -> OldTrace | None:
        """The record an update needs from what :meth:`capture` gave."""
        if trace is None:
            return None
        return OldTrace(trace.positions(resp), trace) if self.replay else OldTrace(trace)

    @contextlib.contextmanager
    def forward(
        self, old: OldTrace | None, resp: slice | None, chunks: Literal["single", "batch"] = "single"
    ) -> Iterator:
        """The training forward: replays the old routing (kept on until :meth:`end`, so checkpointed layers
        recompute with it) and gathers the current router's log-probs at the old experts (at positions
        ``resp``; ``None``: the trace covers every position of the forward)."""
        if self.routers is None or old is None:
            yield None
            return
        if old.full is not None:
            self.routers.start_replay(old.full, mode="logits" if self.opts.control == "replay_logits" else "indices")
        with self.routers.gather(
            old.trace, positions=resp, keep_grad=not self.opts.stop_gradient, chunks=chunks
        ) as cur:
            yield cur

    def end(self) -> None:
        """After the backward of a training forward (or when it is abandoned): stop replaying."""
        if self.routers is not None:
            self.routers.stop_replay()

    def gamma(self, old: OldTrace, cur: RouterTrace) -> Tensor:
        """The router-shift ratio ``(B, T)`` in [gamma_min, 1]; detached unless ``stop_gradient=False``."""
        return router_gamma(self.opts, old, cur)

    def metrics(
        self, old: OldTrace, cur: RouterTrace, gamma: Tensor, mask: Tensor, histogram: bool = True
    ) -> dict[str, Any]:
        """The router metrics of one update (:func:`router_metrics`)."""
        return router_metrics(self.opts, old, cur, gamma, mask, self.routers.num_experts, histogram=histogram)


def router_gamma(opts: RoutingOptions, old: OldTrace, cur: RouterTrace) -> Tensor:
    """The router-shift ratio ``(B, T)`` in [gamma_min, 1] from the old and the current router log-probs at
    the old experts; detached unless ``opts.stop_gradient`` is False. The one place gamma is made."""
    g = router_shift_ratio_with_grad(
        old.trace.logp.to(cur.logp.dtype),
        cur.logp,
        expert_agg=opts.expert_agg,
        layer_agg=opts.layer_agg,
        gamma_min=opts.gamma_min,
    )
    return g if not opts.stop_gradient else g.detach()


def router_metrics(
    opts: RoutingOptions,
    old: OldTrace,
    cur: RouterTrace,
    gamma: Tensor,
    mask: Tensor,
    num_experts: int | None = None,
    histogram: bool = True,
) -> dict[str, Any]:
    """The router metrics of one update, over the response mask (the one place they are computed):
    ``router/gamma_{mean,p10,min,at_floor}``, the tail (``gamma_p1``, ``gamma_p50``, shares
    ``gamma_below_{0.99,0.95,0.9}``), ``router/non_shifted_ratio`` (all layers keep their top-K set), per
    layer ``router/keep_layer{l}`` (the same share at layer l) and ``router/shift_layer{l}`` (mean over tokens
    of mean_k |log r_new - log r_old| at layer l: -log g_l); with ``num_experts``, ``router/load_max_ratio``
    (the busiest expert's share of tokens x E, mean over layers; 1 = balanced); with ``histogram``,
    ``router/gamma_hist`` (token counts per :data:`~rspo.routing.shift.GAMMA_EDGES` bin, a list)."""
    sel = mask > 0
    out: dict[str, Any] = {
        **gamma_metrics(gamma.detach(), mask, opts.gamma_min),
        **gamma_tail_metrics(gamma, mask),
        "router/non_shifted_ratio": non_shifted_ratio(old.trace.topk_idx, cur.topk_idx, mask),
    }
    if num_experts is not None:
        idx = cur.topk_idx.long()[sel]  # (n, L, K) current experts
        loads = torch.stack(
            [torch.bincount(idx[:, layer].reshape(-1), minlength=num_experts) for layer in range(idx.shape[1])]
        ).float()  # (L, E)
        share = loads / loads.sum(1, keepdim=True).clamp(min=1)
        out["router/load_max_ratio"] = float((share.max(1).values * num_experts).mean())
    if histogram:
        out["router/gamma_hist"] = gamma_histogram(gamma, mask)
    with torch.no_grad():
        same = (old.trace.topk_idx.sort(-1).values == cur.topk_idx.sort(-1).values).all(-1)[sel]  # (n, L)
        eps = math.log(1e-8)
        d = (cur.logp.detach().clamp(min=eps) - old.trace.logp.clamp(min=eps)).abs().mean(-1)[sel]  # (n, L)
        if same.numel():
            for layer in range(same.shape[1]):
                out[f"router/keep_layer{layer}"] = float(same[:, layer].double().mean())
                out[f"router/shift_layer{layer}"] = float(d[:, layer].double().mean())
    return out
