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
from typing import Any, Literal, Protocol

import torch
from torch import nn

from rspo.errors import ModelError
from rspo.routing.capture import MoERouters, RouterTrace, index_dtype
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
RoutingControl = Literal["none", "freeze", "replay_logits", "replay_indices", "replay_rollout"]
"""Router freezing; routing replay from the old pass (``replay_logits``: experts and weights; ``replay_indices``,
R2: experts, weights from the current router); rollout routing replay (``replay_rollout``, R3: the experts the
rollout engine chose, weights from the current router, in the old pass and every update)."""


class Routers(Protocol):
    """What the routing step drives: :class:`~rspo.routing.MoERouters` (transformers) or another engine's
    routers with the same interface (:class:`rspo.integrations.megatron.MegatronRouters`)."""

    top_k: int
    model_top_k: int
    num_experts: int

    def capture(
        self, positions: slice | None = None, weights: bool = False, chunks: str = "sequence", logp: bool = True
    ) -> contextlib.AbstractContextManager: ...

    def gather(
        self, trace: RouterTrace, positions: slice | None = None, keep_grad: bool = False, chunks: str = "single"
    ) -> contextlib.AbstractContextManager: ...

    def start_replay(self, trace: RouterTrace, mode: str = "indices") -> None: ...

    def stop_replay(self) -> None: ...

    def freeze(self) -> None: ...


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
    position (``full``, only for routing replay).

    Under rollout routing replay (R3) "old" is the rollout's routing: ``trace.topk_idx`` are the experts the
    rollout engine chose, ``trace.logp`` the old policy's router log-probs at them (its old pass, replayed),
    and ``own`` the old policy's own top-K, which the replay overrode (for the agreement diagnostics)."""

    trace: RouterTrace
    full: RouterTrace | None = None
    own: Tensor | None = None

    def __getitem__(self, rows) -> OldTrace:
        return OldTrace(
            self.trace[rows],
            None if self.full is None else self.full[rows],
            None if self.own is None else self.own[rows],
        )


def rollout_trace(experts: Tensor | RouterTrace) -> RouterTrace:
    """A replay trace of every position ``(B, S, L, k)`` from a rollout's routing ``(B, S - 1, L, k)`` (vLLM's
    layout: the last token was never an input; rspo's sampler records it so). The last position's output
    scores nothing, so its experts only need to be valid: ``0..k-1``. A :class:`RouterTrace` (from
    :func:`align_routed_experts`) is already one."""
    if isinstance(experts, RouterTrace):
        return experts
    if experts.dim() != 4:
        raise ValueError(f"routed experts must be (B, S - 1, L, k), got shape {tuple(experts.shape)}")
    b, _, layers, k = experts.shape
    last = torch.arange(k, device=experts.device, dtype=experts.dtype).expand(b, 1, layers, k)
    idx = torch.cat([experts, last], dim=1)
    return RouterTrace(idx, _no_logp(idx))


def _no_logp(idx: Tensor) -> Tensor:
    """An empty log-prob field for a replay trace (replay reads the experts only): no memory per expert."""
    return torch.zeros((*idx.shape[:-1], 0), dtype=torch.float32, device=idx.device)


def align_routed_experts(
    records: list[Any],
    prompt_lens: list[int],
    response_lens: list[int],
    prompt_len: int,
    seq_len: int,
    *,
    prompt_start: int = 0,
    num_layers: int | None = None,
    top_k: int | None = None,
    num_experts: int | None = None,
) -> RouterTrace:
    """A rollout engine's routing, one array per sequence, as a replay trace of rspo's layout: prompts
    left-padded to ``prompt_len`` P, responses right-padded, ``seq_len`` S = P + T positions.

    ``records[i]``: ``(n_i, L, k)`` integers (numpy uint8 or uint16 as vLLM returns them, int32 as SGLang's,
    or a tensor), row j the experts of input position ``prompt_start + j`` of sequence i (its prompt tokens,
    then its response tokens but the last): ``n_i = p_i + g_i - 1 - prompt_start``, with ``p_i`` and ``g_i``
    from ``prompt_lens`` and ``response_lens``. Positions without a record (padding, and the first
    ``prompt_start`` prompt tokens that vLLM's ``routed_experts_prompt_start`` drops) keep the router's own
    experts in the replay (``trace.known``). A record of another length, layer count, top-k or an expert
    index out of range is an error naming the sequence."""
    import numpy as np

    b = len(records)
    if not (len(prompt_lens) == len(response_lens) == b):
        raise ValueError(f"{b} routing records for {len(prompt_lens)} prompts and {len(response_lens)} responses")
    idx = known = None
    for i, (rec, p, g) in enumerate(zip(records, prompt_lens, response_lens, strict=True)):
        arr = torch.as_tensor(np.asarray(rec).astype(np.int64)) if not isinstance(rec, Tensor) else rec.long()
        want = p + g - 1 - prompt_start
        if arr.dim() != 3 or arr.shape[0] != want:
            raise ValueError(
                f"routed experts of sequence {i}: shape {tuple(arr.shape)}, expected ({want}, L, k) "
                f"for {p} prompt and {g} response tokens from prompt position {prompt_start}"
            )
        if p > prompt_len or g > seq_len - prompt_len:
            raise ValueError(
                f"sequence {i} has {p} prompt / {g} response tokens; the batch holds {prompt_len} / "
                f"{seq_len - prompt_len}"
            )
        if idx is None:
            layers, k = arr.shape[1:]
            if (num_layers is not None and layers != num_layers) or (top_k is not None and k != top_k):
                raise ValueError(f"routed experts have {layers} layers x top-{k}; the model {num_layers} x top-{top_k}")
            idx = torch.arange(k).expand(b, seq_len, layers, k).clone()
            known = torch.zeros(b, seq_len, dtype=torch.bool)
        elif arr.shape[1:] != idx.shape[2:]:
            raise ValueError(
                f"routed experts of sequence {i}: {tuple(arr.shape[1:])} layers x k, the first had "
                f"{tuple(idx.shape[2:])}"
            )
        if num_experts is not None and arr.numel() and (arr.min() < 0 or arr.max() >= num_experts):
            raise ValueError(f"routed experts of sequence {i} hold indices outside 0..{num_experts - 1}")
        start = prompt_len - p + prompt_start  # input position prompt_start of sequence i, left-padded
        idx[i, start : start + want] = arr
        known[i, start : start + want] = True
    if idx is None:
        raise ValueError("no routing records")
    idx = idx.to(index_dtype(num_experts if num_experts is not None else int(idx.max()) + 1))  # uint8 up to 256
    return RouterTrace(idx, _no_logp(idx), known=known)


def is_moe(model: nn.Module) -> bool:
    try:
        family_of(model)
        return True
    except ModelError:
        return False


def _refuse_dense(model: nn.Module, opts: RoutingOptions, needs: bool) -> None:
    if looks_moe(model):
        family_of(model)  # an MoE of an unsupported family: its error names the supported ones
    what = "router shift" if opts.shift else f"routing control {opts.control!r}" if needs else "log_router"
    raise ModelError(f"{type(model).__name__} is a dense model (no MoE router): {what} needs an MoE model")


class RoutingStep:
    """The routing side of one RL update (see the module docstring). A dense model is accepted when
    nothing needs a router; asking it for router shift, a routing control or router logging is an error
    naming the model class."""

    def __init__(self, model: nn.Module, opts: RoutingOptions, routers: Routers | None = None) -> None:
        """``routers``: another engine's routers (Megatron-Core's); None finds the transformers model's."""
        self.opts = opts
        needs = opts.shift or opts.control != "none"
        if routers is None:
            if not is_moe(model):
                if needs or opts.log:
                    _refuse_dense(model, opts, needs)
                self.routers = None
                return
            routers = MoERouters(model, top_k=opts.top_k, prob=opts.prob)  # checks top_k and prob even if unused
        self.routers = routers if needs or opts.log is not False else None
        if self.routers is None:
            return
        if opts.control == "freeze":
            self.routers.freeze()
        if opts.control == "replay_rollout" and self.routers.top_k != self.routers.model_top_k:
            raise ValueError(
                f"routing control replay_rollout replays the rollout's {self.routers.model_top_k} experts per layer: "
                f"router_shift.top_k={opts.top_k} cannot apply (leave it null)"
            )

    @property
    def active(self) -> bool:
        """Whether router data is captured at all."""
        return self.routers is not None

    @property
    def replay(self) -> bool:
        return self.opts.control in ("replay_logits", "replay_indices", "replay_rollout")

    @property
    def replays_rollout(self) -> bool:
        """Rollout routing replay (R3): the old pass and every update need the rollout's routed experts."""
        return self.opts.control == "replay_rollout"

    @contextlib.contextmanager
    def capture(
        self, resp: slice | None, chunks: Literal["sequence", "batch"] = "batch", rollout: Tensor | None = None
    ) -> Iterator:
        """The old pass: records the old top-K experts and router log-probs at the response positions ``resp``
        (every position for replay, or with ``resp=None``). With rollout routing replay, the forward is routed
        to the rollout's experts ``rollout`` ``(B, S - 1, L, k)`` and records the old router's log-probs at
        them (``trace.logp``) and its own top-K (``trace.topk_idx``)."""
        if self.routers is None:
            yield None
            return
        if self.replays_rollout:
            if rollout is None:
                raise ValueError("routing control replay_rollout needs the rollout's routed experts (record_routing)")
            full = rollout_trace(rollout)
            self.routers.start_replay(full, mode="indices")
            try:
                with self.routers.gather(full if resp is None else full.positions(resp), positions=resp) as rec:
                    yield rec
            finally:
                self.routers.stop_replay()
            return
        weights = self.opts.control == "replay_logits"  # replay_indices (R2) replays the experts only
        with self.routers.capture(positions=None if self.replay else resp, weights=weights, chunks=chunks) as rec:
            yield rec

    def old_trace(self, trace: RouterTrace | None, resp: slice, rollout: Tensor | None = None) -> OldTrace | None:
        """The record an update needs from what :meth:`capture` gave (and, under R3, the rollout's routing)."""
        if trace is None:
            return None
        if self.replays_rollout:
            full = rollout_trace(rollout)
            return OldTrace(RouterTrace(full.topk_idx[:, resp], trace.logp), full, own=trace.topk_idx)
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


def routing_agreement(reference: Tensor, own: Tensor, mask: Tensor, prefix: str) -> dict[str, float]:
    """How often a router's own top-K set equals a reference routing (the rollout's), over the response mask:
    ``{prefix}agree_layer{l}`` per MoE layer and ``{prefix}disagree_tokens``, the share of tokens whose set
    differs in at least one layer. ``reference``, ``own``: ``(B, T, L, K)`` expert indices."""
    with torch.no_grad():
        same = (reference.long().sort(-1).values == own.long().sort(-1).values).all(-1)[mask > 0]  # (n, L)
        out = {f"{prefix}agree_layer{layer}": float(same[:, layer].double().mean()) for layer in range(same.shape[1])}
        out[f"{prefix}disagree_tokens"] = float((~same.all(-1)).double().mean()) if same.numel() else 0.0
    return out
