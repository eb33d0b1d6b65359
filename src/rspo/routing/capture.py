"""Router capture and routing control via forward hooks on the routers of a transformers MoE model.

Usage in an RL step (no extra forward pass for router data)::

    routers = MoERouters(model)                      # finds the MoE layers, skips dense ones
    with torch.no_grad(), routers.capture(positions=resp) as old:    # the old-log-prob pass
        old_logits = model(input_ids, attention_mask=am).logits
    trace = old.trace                                # RouterTrace: topk_idx, logp (B, T, L, K)

    with routers.gather(trace, positions=resp) as cur:               # the training pass
        logits = model(input_ids, attention_mask=am).logits
    gamma = router_shift_ratio(trace.logp, cur.logp)                # (B, T)

Token alignment: ``positions`` selects sequence positions of the forward, like the slice of
logits that scores the response, ``slice(S - T - 1, S - 1)``; the router record at the position
whose output predicts response token t belongs to token t (its routing is r(. | x, y_<t), the
paper's conditioning). ``positions=None`` keeps every position, and successive forward calls
(KV-cache decoding in ``generate``) are concatenated along the sequence.

Memory: inside the hook the ``(N, E)`` router output is reduced to the K stored experts
immediately, and only the requested positions are kept: per token and MoE layer K expert
indices (uint8 when E <= 256) and K float32 log-probs, i.e. ``L * K * 5`` bytes per token
(Qwen3-30B-A3B, L=48, K=8: 1,920 bytes/token). Nothing of size ``(B, T, L, E)`` is ever held.

Gradient checkpointing: a layer recomputed during backward runs the hooks again; records are
not appended a second time (the hook knows it runs inside the autograd engine), while replay
hooks still rewrite the router output so that the recomputation matches the original forward.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from rspo.errors import ModelError
from rspo.routing.families import RouterFamily, RouterProb, adapt_split_routers, family_of, router_log_probs_at

Tensor = torch.Tensor
ReplayMode = Literal["indices", "logits"]
Positions = slice | None


def index_dtype(num_experts: int) -> torch.dtype:
    """Smallest integer dtype that holds expert indices 0..num_experts-1."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 32768:
        return torch.int16
    return torch.int32


def _in_backward() -> bool:
    """True while the autograd engine runs (e.g. a checkpointed layer being recomputed)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class RouterTrace:
    """Router record of one forward, per kept token and MoE layer.

    topk_idx: ``(B, T, L, K)`` expert indices (smallest integer dtype).
    logp: ``(B, T, L, K)`` router log-probs at those experts, float32 (float64 for a float64 router; with grad
        only from ``gather(..., keep_grad=True)``).
    weights: ``(B, T, L, k)`` the weights the experts received, in the router's dtype (kept by
        ``capture(weights=True)``, needed by ``replay(mode='logits')``), else None.
    known: ``(B, T)`` bool, for replay only: the positions whose experts the trace holds; the others keep
        the router's own choice (a rollout engine that dropped the prompt's routing); None = all.
    """

    topk_idx: Tensor
    logp: Tensor
    weights: Tensor | None = None
    known: Tensor | None = None

    def __getitem__(self, rows: Tensor | slice | list[int]) -> RouterTrace:
        w = None if self.weights is None else self.weights[rows]
        return RouterTrace(self.topk_idx[rows], self.logp[rows], w, None if self.known is None else self.known[rows])

    def positions(self, sl: slice) -> RouterTrace:
        """The same trace restricted to sequence positions ``sl``."""
        w = None if self.weights is None else self.weights[:, sl]
        known = None if self.known is None else self.known[:, sl]
        return RouterTrace(self.topk_idx[:, sl], self.logp[:, sl], w, known)

    def to(self, device: torch.device | str) -> RouterTrace:
        w = None if self.weights is None else self.weights.to(device)
        known = None if self.known is None else self.known.to(device)
        return RouterTrace(self.topk_idx.to(device), self.logp.to(device), w, known)

    @property
    def nbytes(self) -> int:
        total = self.topk_idx.numel() * self.topk_idx.element_size() + self.logp.numel() * self.logp.element_size()
        if self.weights is not None:
            total += self.weights.numel() * self.weights.element_size()
        return total


@dataclass
class _Recorder:
    """Per-layer chunks appended by the hooks during one context; assembled on exit."""

    num_layers: int
    positions: Positions
    concat_dim: int = 1
    idx: list[list[Tensor]] = field(default_factory=list)
    logp: list[list[Tensor]] = field(default_factory=list)
    weights: list[list[Tensor]] | None = None
    trace: RouterTrace | None = None

    def __post_init__(self) -> None:
        self.idx = [[] for _ in range(self.num_layers)]
        self.logp = [[] for _ in range(self.num_layers)]

    def finish(self) -> RouterTrace:
        if any(len(c) != len(self.idx[0]) for c in self.idx) or not self.idx[0]:
            counts = [len(c) for c in self.idx]
            raise RuntimeError(f"router capture saw an unequal or empty number of calls per MoE layer: {counts}")
        d = self.concat_dim
        idx = torch.stack([torch.cat(c, dim=d) for c in self.idx], dim=2)  # (B, T, L, K)
        logp = torch.stack([torch.cat(c, dim=d) for c in self.logp], dim=2)
        w = None
        if self.weights is not None:
            w = torch.stack([torch.cat(c, dim=d) for c in self.weights], dim=2)
        self.trace = RouterTrace(idx, logp, w)
        return self.trace


class MoERouters:
    """The MoE routers of a transformers model, with capture, gather, replay and freeze.

    Args:
        model: a causal LM of a supported family (see ``rspo.routing.families``).
        top_k: K, the number of old experts per layer stored and used for the shift; defaults
            to the model's experts-per-token. With another K, the top-K of the family's
            selection score is stored (for DeepSeek-V3 without its group restriction).
        prob: ``full`` (default: full-softmax probability, sigmoid score for sigmoid routers)
            or ``topk_renorm`` (renormalised over the old top-K set).
    """

    def __init__(self, model: nn.Module, top_k: int | None = None, prob: RouterProb = "full") -> None:
        self.model = model
        self.family: RouterFamily = family_of(model)
        adapt_split_routers(model)  # transformers < 5.11: DeepSeek-V3's router returns logits only
        found = [(name, m) for name, m in model.named_modules() if type(m).__name__ == self.family.router_class]
        if not found:
            raise ModelError(
                f"{type(model).__name__} (model_type={self.family.model_type!r}) has no MoE layer "
                f"(no {self.family.router_class} module): every layer is dense"
            )
        self.names = [n for n, _ in found]
        self.routers: list[nn.Module] = [m for _, m in found]
        self.layer_ids = [_layer_index(n) for n in self.names]
        self.num_experts = int(self.routers[0].num_experts)
        self.model_top_k = int(self.routers[0].top_k)
        self.top_k = self.model_top_k if top_k is None else int(top_k)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}] (num_experts), got {top_k}")
        if prob not in ("full", "topk_renorm"):
            raise ValueError(f"prob={prob!r}; valid values: full, topk_renorm")
        self.prob: RouterProb = prob
        self.idx_dtype = index_dtype(self.num_experts)
        self._batch_size: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def bytes_per_token(self, with_weights: bool = False) -> int:
        """Trace bytes per stored token: L * K * (index bytes + 4), plus L * k * 4 for replay weights."""
        per = self.num_layers * self.top_k * (torch.empty(0, dtype=self.idx_dtype).element_size() + 4)
        return per + (self.num_layers * self.model_top_k * 4 if with_weights else 0)

    def router_parameters(self) -> list[nn.Parameter]:
        """Parameters of the routers (gate weights, and biases where the family has them)."""
        return [p for r in self.routers for p in r.parameters(recurse=False)]

    def freeze(self) -> None:
        """Routing control ``freeze``: router parameters receive no gradient, hence no update."""
        for p in self.router_parameters():
            p.requires_grad_(False)

    # ---------------------------------------------------------------- hook plumbing
    @contextlib.contextmanager
    def _hooks(self, make_hook) -> Iterator[None]:
        handles = [self.model.register_forward_pre_hook(self._see_batch, with_kwargs=True)]
        try:
            for layer, router in enumerate(self.routers):
                handles.append(router.register_forward_hook(make_hook(layer)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _see_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if x is None:
            raise ValueError("router capture needs input_ids or inputs_embeds to know the batch size")
        self._batch_size = int(x.shape[0])

    def _to_bs(self, t: Tensor) -> Tensor:
        """(N, ...) -> (B, S, ...) using the batch size seen by the model pre-hook."""
        b = self._batch_size
        if b is None or t.shape[0] % b:
            raise RuntimeError(f"cannot split {t.shape[0]} router tokens into batch size {b}")
        return t.reshape(b, t.shape[0] // b, *t.shape[1:])

    def _stored_indices(self, router: nn.Module, logits: Tensor, idx: Tensor) -> Tensor:
        """The router's own top-K experts: its output ``idx``, or from the logits when K differs from the
        model's top-k or a replay has replaced the output (the router's choice, not the replayed one)."""
        if self.top_k == self.model_top_k and not self.replaying:
            return idx
        return self.family.selection_scores(router, logits).topk(self.top_k, dim=-1).indices

    @property
    def replaying(self) -> bool:
        """Whether a replay (:meth:`start_replay`) rewrites the routers' outputs now."""
        return bool(getattr(self, "_replay_handles", None))

    # ---------------------------------------------------------------- capture / gather
    @contextlib.contextmanager
    def capture(
        self,
        positions: Positions = None,
        weights: bool = False,
        chunks: Literal["sequence", "batch"] = "sequence",
        logp: bool = True,
    ) -> Iterator[_Recorder]:
        """Record the old top-K indices and router log-probs; ``.trace`` is set on exit.

        ``weights=True`` also keeps the expert weights (needed by ``replay(mode='logits')``).
        ``logp=False`` records the experts only (``trace.logp`` is empty): what a rollout engine returns
        for routing replay, at one small integer per token, layer and expert.
        Several forward calls in one context are concatenated along the sequence (``chunks='sequence'``:
        KV-cache decoding) or along the batch (``chunks='batch'``: a batch split into row chunks).
        """
        rec = _Recorder(self.num_layers, positions, concat_dim=1 if chunks == "sequence" else 0)
        if weights:
            rec.weights = [[] for _ in range(self.num_layers)]

        def make_hook(layer: int):
            router = self.routers[layer]

            def hook(module: nn.Module, inputs: tuple, output: tuple) -> None:
                if _in_backward():
                    return
                logits, w, idx = output
                with torch.no_grad():
                    sel = self._stored_indices(router, logits, idx)
                    lp = router_log_probs_at(self.family, logits, sel, self.prob) if logp else sel[:, :0].float()
                    sel_bs, lp_bs = self._to_bs(sel), self._to_bs(lp)
                    if positions is not None:
                        sel_bs, lp_bs = sel_bs[:, positions], lp_bs[:, positions]
                    rec.idx[layer].append(sel_bs.to(self.idx_dtype))
                    rec.logp[layer].append(lp_bs if lp_bs.dtype == torch.float64 else lp_bs.float())
                    if rec.weights is not None:
                        w_bs = self._to_bs(w.detach())
                        rec.weights[layer].append(w_bs if positions is None else w_bs[:, positions])

            return hook

        with self._hooks(make_hook):
            yield rec
        rec.finish()

    @contextlib.contextmanager
    def gather(
        self,
        trace: RouterTrace,
        positions: Positions = None,
        keep_grad: bool = False,
        chunks: Literal["single", "batch"] = "single",
    ) -> Iterator[_Recorder]:
        """In the training forward: current router log-probs at the trace's stored experts.

        On exit ``.trace`` holds ``logp`` ``(B, T, L, K)`` (current router, old experts) and
        ``topk_idx``, the experts the current router selected (for the non-shifted ratio).
        ``keep_grad=True`` keeps the graph to the router (the stop-gradient ablation only).
        ``chunks='batch'``: the batch arrives as successive row chunks, matched to the trace in order.
        """
        rec = _Recorder(self.num_layers, positions, concat_dim=0)
        old_idx = trace.topk_idx
        offsets = [0] * self.num_layers  # rows of the trace consumed per layer (chunks='batch')

        def make_hook(layer: int):
            router = self.routers[layer]

            def hook(module: nn.Module, inputs: tuple, output: tuple) -> None:
                recompute = _in_backward()
                if recompute and not keep_grad:
                    return
                logits, _, idx = output
                with torch.set_grad_enabled(keep_grad and torch.is_grad_enabled()):
                    logits_bs = self._to_bs(logits)
                    cur = self._to_bs(self._stored_indices(router, logits, idx).detach())
                    if positions is not None:
                        logits_bs, cur = logits_bs[:, positions], cur[:, positions]
                    if chunks == "batch":
                        start = offsets[layer]
                        stored = old_idx[start : start + logits_bs.shape[0], :, layer].long()
                    else:
                        stored = old_idx[:, :, layer].long()
                    if stored.shape[:2] != logits_bs.shape[:2]:
                        raise ValueError(
                            f"trace has {tuple(stored.shape[:2])} (B, T) tokens at MoE layer {layer}, the forward "
                            f"{tuple(logits_bs.shape[:2])}: select the trace rows/positions of this mini-batch"
                        )
                    b, t, e = logits_bs.shape
                    lp = router_log_probs_at(
                        self.family, logits_bs.reshape(b * t, e), stored.reshape(b * t, -1), self.prob
                    )
                if recompute:
                    return  # ops redone so a non-reentrant checkpoint sees the same saved tensors
                offsets[layer] += b
                rec.logp[layer].append(lp.reshape(b, t, -1))
                rec.idx[layer].append(cur.to(self.idx_dtype))

            return hook

        with self._hooks(make_hook):
            yield rec
        rec.finish()

    # ---------------------------------------------------------------- routing replay
    @contextlib.contextmanager
    def replay(self, trace: RouterTrace, mode: ReplayMode = "indices") -> Iterator[None]:
        """Force the forward's routing from a trace recorded on *every* position (``positions=None``).

        - ``indices`` (GSPO's Routing Replay, "R2"): experts = the stored old top-k; weights from
          the current router for those experts (the router still gets gradients).
        - ``logits`` (copy the old router): experts and weights both from the old pass, detached
          (no gradient reaches the router). Needs ``capture(weights=True)``.
        The trace must have been captured with K = the model's experts-per-token. With gradient
        checkpointing, the backward must run inside the context too (layers are recomputed then);
        otherwise use :meth:`start_replay` / :meth:`stop_replay`.
        """
        self.start_replay(trace, mode)
        try:
            yield
        finally:
            self.stop_replay()

    def start_replay(self, trace: RouterTrace, mode: ReplayMode = "indices") -> None:
        """Replay ``trace`` in every forward (and checkpoint recomputation) until :meth:`stop_replay`."""
        if mode not in ("indices", "logits"):
            raise ValueError(f"replay mode={mode!r}; valid values: indices, logits")
        if trace.topk_idx.shape[-1] != self.model_top_k:
            raise ValueError(
                f"replay needs the model's top-k ({self.model_top_k}) experts per layer in the trace, "
                f"got K={trace.topk_idx.shape[-1]}"
            )
        if mode == "logits" and trace.weights is None:
            raise ValueError("replay(mode='logits') needs a trace captured with capture(weights=True)")
        self.stop_replay()

        def make_hook(layer: int):
            router = self.routers[layer]

            def hook(module: nn.Module, inputs: tuple, output: tuple) -> tuple:
                logits, _, idx = output
                n = logits.shape[0]
                stored = trace.topk_idx[:, :, layer]
                if stored.shape[0] * stored.shape[1] != n:
                    raise ValueError(
                        f"replay trace has {stored.shape[0]}x{stored.shape[1]} tokens at MoE layer {layer}, the "
                        f"forward {n}: replay needs a full-sequence trace of exactly this batch"
                    )
                new_idx = stored.reshape(n, -1).to(idx.dtype)
                if trace.known is not None:  # positions without a record keep the router's own experts
                    new_idx = torch.where(trace.known.reshape(n, 1), new_idx, idx)
                if mode == "indices":
                    new_w = self.family.weights_at(router, logits, new_idx)
                else:
                    new_w = trace.weights[:, :, layer].reshape(n, -1)  # as the router returned them
                return logits, new_w, new_idx

            return hook

        self._replay_handles = [r.register_forward_hook(make_hook(i)) for i, r in enumerate(self.routers)]

    def stop_replay(self) -> None:
        for h in getattr(self, "_replay_handles", []):
            h.remove()
        self._replay_handles = []


def _layer_index(name: str) -> int:
    """Decoder layer index from a module name like ``model.layers.3.mlp.gate``."""
    parts = name.split(".")
    for a, b in itertools.pairwise(parts):
        if a == "layers" and b.isdigit():
            return int(b)
    return -1
