"""RSPO on Megatron-Core (0.16.x): router capture, routing replay and the policy loss at the level verl's
Megatron backend, slime and NeMo-RL train through.

The engine keeps its own loop; per update it runs the old pass and the training forward of each micro-batch
inside rspo's one routing step, and returns this module's loss from its loss function::

    from rspo.integrations.megatron import megatron_routing_step, policy_loss

    step = megatron_routing_step(model, opts)            # opts: rspo.options.Options; checks the model's config
    with torch.no_grad(), step.capture(resp) as rec:     # the old pass
        old_logits = model(input_ids=ids, position_ids=pos, attention_mask=am)
    old = step.old_trace(rec.trace, resp)
    ...
    def forward_step(data_iterator, model):              # Megatron's schedule calls this per micro-batch
        mb = next(data_iterator)
        with step.forward(old[mb.rows], resp) as cur:    # replay (R2/R3) and the current router log-probs
            logits = model(input_ids=mb.ids, position_ids=mb.pos, attention_mask=mb.am)
        def loss_func(logits):
            gamma = step.gamma(old[mb.rows], cur.trace)  # (B, T), stop-gradient
            return policy_loss(log_probs(logits), mb.old_logp, mb.adv, mb.mask, options=opts, router_shift=gamma,
                               num_microbatches=n_mb, global_count=n_seq)
        return logits, loss_func
    ... forward_backward_func(...); step.end()

What the router gives. Megatron's ``TopKRouter`` returns only the sparse top-K weights and a boolean
``routing_map``; the logits stay inside. A forward pre-hook on each ``MoELayer`` recomputes the router logits
from the layer's input and the router weight (float32; float64 with ``moe_router_dtype='fp64'`` or float64
weights), outside any recompute of the MoE module, and a forward hook on the router takes ``routing_map`` (the
experts used, replayed ones included). The probability gamma uses, per score function:

| ``moe_router_score_function`` | r in gamma (``prob='full'``) | the experts' weights |
|---|---|---|
| softmax, ``moe_router_pre_softmax=False`` (default) | softmax over all E | softmax over the K chosen logits |
| softmax, ``moe_router_pre_softmax=True`` | softmax over all E | softmax over all E at the K |
| sigmoid | sigmoid(logit), per expert | sigmoid at the K, renormalised |

``prob='topk_renorm'`` renormalises over the old top-K set: for the default softmax router that is exactly the
weight Megatron gave the expert. Hidden states are sequence-first ``[S, B, H]`` (token ``s * B + b``); traces are
``(B, S, L, K)`` like the forward's ``input_ids`` ``(B, S)``. A packed (THD) batch is one row ``(1, T_total)``: the
trace follows the packed tokens, as the engine's packed log-probs do; :func:`unpack_packed` unpacks both.

Routing replay uses Megatron-Core's own ``RouterReplay`` (``moe_enable_routing_replay=True``): before each
forward of a replayed layer the pre-hook sets that router's target indices and the ``REPLAY_FORWARD`` action,
so a recompute of the MoE module in backward replays the same experts. R2 (``replay_indices``) replays the old
pass's experts, R3 (``replay_rollout``) the rollout engine's; the weights come from the current router.

Tensor parallelism with sequence parallelism: each rank's routers see a contiguous shard of the sequence; the
capture gathers the shards over the tensor-parallel group (every rank then holds the whole sequence's trace, as
its loss holds the whole sequence's log-probs) and replay sets each rank's shard of the targets.

Rejected by name (:func:`check_config`), with why: full-layer recompute, the options that make the router's
input or top-K differ from what the hooks see (input jitter, forced balancing, sinkhorn, token dropping, fused
routing under replay), CUDA graphs, multi-token prediction, gamma with gradient under sequence parallelism, and
the parallel layouts not built yet: context parallel and pipeline stages. Gamma is a mean over all MoE layers of each
token; with pipeline stages the loss on the last stage sees only its own routers. Combining stages needs each
stage's per-token sum of log g_l (stop-gradient: no gradient crosses stages) summed over the pipeline group
before the loss, divided by the model's MoE layer count: an extra reduction this adapter does not do yet.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from rspo.errors import ConfigError, ModelError
from rspo.objectives import aggregation_count, compute_policy_loss, get_objective
from rspo.options import Options
from rspo.routing.capture import ReplayMode, RouterTrace, _in_backward, _Recorder, index_dtype
from rspo.routing.families import RouterProb, router_log_probs_at
from rspo.routing.step import RoutingStep

Tensor = torch.Tensor
Positions = slice | None

NO_LOGITS_REPLAY = "Megatron-Core's RouterReplay replays experts only (replay_indices, R2, or replay_rollout, R3)"

MOE_LAYER = "MoELayer"
ROUTER = "TopKRouter"


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    """The model's Megatron-Core MoE layers (``MoELayer`` and subclasses), in global layer order."""
    layers = [m for m in model.modules() if any(c.__name__ == MOE_LAYER for c in type(m).__mro__)]
    for m in layers:
        if not any(c.__name__ == ROUTER for c in type(getattr(m, "router", None)).__mro__):
            raise ModelError(f"{type(m).__name__} has no {ROUTER} router (got {type(m.router).__name__})")
    return sorted(layers, key=lambda m: m.router.layer_number or 0)


def _world(group_getter: str) -> int:
    from megatron.core import parallel_state

    try:
        return int(getattr(parallel_state, group_getter)())
    except (AssertionError, RuntimeError):  # model-parallel state not initialised: one process
        return 1


def check_config(config: Any, *, replay: bool, own_top_k: bool, keep_grad: bool = False) -> None:
    """Reject, naming the option, each Megatron-Core setting under which the router capture, gamma or replay
    would be wrong. ``replay``: a routing replay is requested; ``own_top_k``: the router's own top-K must be
    recomputed from its logits (a stored K other than the model's, or diagnostics under replay); ``keep_grad``:
    gamma keeps its gradient (``router_shift.stop_gradient=false``, an ablation)."""

    def get(name: str, default: Any = None) -> Any:
        return getattr(config, name, default)

    def bad(option: str, why: str) -> None:
        raise ConfigError(f"Megatron-Core {option}: {why}")

    if get("recompute_granularity") == "full":
        bad(
            "recompute_granularity='full'",
            "full-layer activation recompute runs each layer's forward without autograd and again inside "
            "backward, so the router capture and replay cannot follow it; use recompute_granularity='selective' "
            "with 'moe' in recompute_modules (supported) or no recompute",
        )
    if get("moe_input_jitter_eps"):
        bad("moe_input_jitter_eps", "the router sees a jittered input the capture cannot reproduce; unset it")
    if get("moe_router_force_load_balancing"):
        bad("moe_router_force_load_balancing", "random router logits: there is no router shift to measure")
    if get("moe_router_load_balancing_type") == "sinkhorn":
        bad("moe_router_load_balancing_type='sinkhorn'", "sinkhorn routing is not a top-K of router scores")
    if get("moe_expert_capacity_factor") is not None:
        bad("moe_expert_capacity_factor", "token dropping leaves tokens with fewer than top-K experts; unset it")
    if get("mtp_num_layers"):
        bad("mtp_num_layers", "multi-token-prediction layers' routers are not part of gamma yet; unset it")
    if get("cuda_graph_impl", "none") not in (None, "none"):
        bad(f"cuda_graph_impl={get('cuda_graph_impl')!r}", "graph replay skips the module hooks the capture uses")
    if get("enable_cuda_graph"):
        bad("enable_cuda_graph", "graph replay skips the module hooks the capture uses")
    if replay and get("moe_router_fusion"):
        bad("moe_router_fusion", "the fused router ignores Megatron's RouterReplay (routing replay); unset it")
    if replay and not get("moe_enable_routing_replay"):
        bad("moe_enable_routing_replay=False", "routing replay needs Megatron's RouterReplay: set it to True")
    if own_top_k and (get("moe_router_enable_expert_bias") or get("moe_router_group_topk")):
        option = "moe_router_enable_expert_bias" if get("moe_router_enable_expert_bias") else "moe_router_group_topk"
        bad(
            option,
            "the router's own top-K cannot be recomputed from its logits (biased or group-limited selection), "
            "which routing replay diagnostics and router_shift.top_k other than the model's need",
        )
    if get("context_parallel_size", 1) > 1:
        bad("context_parallel_size>1", "each rank routes a slice of every sequence; not supported yet")
    if get("pipeline_model_parallel_size", 1) > 1 or _world("get_pipeline_model_parallel_world_size") > 1:
        bad(
            "pipeline_model_parallel_size>1",
            "gamma is a mean over every MoE layer and the loss on the last stage sees only its own routers "
            "(the stages' sums of log g_l would need a reduction over the pipeline group); not supported yet",
        )
    if get("virtual_pipeline_model_parallel_size"):
        bad("virtual_pipeline_model_parallel_size", "interleaved pipeline stages: not supported yet")
    tp = max(int(get("tensor_model_parallel_size", 1) or 1), _world("get_tensor_model_parallel_world_size"))
    if tp > 1 and get("sequence_parallel") and keep_grad:
        bad(
            "sequence_parallel with tensor_model_parallel_size>1",
            "router_shift.stop_gradient=false (the ablation) needs gamma's gradient through the gather of the "
            "sequence shards, which is not built; keep the stop-gradient or turn sequence parallelism off",
        )


class MegatronRouters:
    """The routers of a Megatron-Core model with the interface :class:`rspo.routing.RoutingStep` drives:
    ``capture``, ``gather``, ``start_replay``/``stop_replay`` and ``freeze``, traces ``(B, S, L, K)``.

    Args:
        model: a Megatron-Core model (``GPTModel``, or a DDP/Float16 wrapper around one) with MoE layers.
        top_k: K old experts per layer; defaults to ``moe_router_topk``.
        prob: ``full`` (softmax over all experts, or the sigmoid score) or ``topk_renorm``.
        replay, keep_grad: whether the run replays routing and keeps gamma's gradient (checked now).
    """

    def __init__(
        self,
        model: nn.Module,
        top_k: int | None = None,
        prob: RouterProb = "full",
        *,
        replay: bool = False,
        keep_grad: bool = False,
    ) -> None:
        self.model = model
        self.layers = _moe_layers(model)
        if not self.layers:
            raise ModelError(f"{type(model).__name__} has no Megatron-Core MoE layer ({MOE_LAYER}): a dense model")
        self.routers = [m.router for m in self.layers]
        config = self.routers[0].config
        self.config = config
        self.score: Literal["softmax", "sigmoid"] = config.moe_router_score_function
        if self.score not in ("softmax", "sigmoid"):
            raise ConfigError(f"Megatron-Core moe_router_score_function={self.score!r}: expected softmax or sigmoid")
        self.num_experts = int(config.num_moe_experts)
        self.model_top_k = int(config.moe_router_topk)
        self.top_k = self.model_top_k if top_k is None else int(top_k)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}] (num_moe_experts), got {top_k}")
        if prob not in ("full", "topk_renorm"):
            raise ValueError(f"prob={prob!r}; valid values: full, topk_renorm")
        self.prob: RouterProb = prob
        check_config(config, replay=replay, own_top_k=replay or self.top_k != self.model_top_k, keep_grad=keep_grad)
        self.idx_dtype = index_dtype(self.num_experts)
        self.logits_dtype = torch.float64 if config.moe_router_dtype == "fp64" else torch.float32
        self._replay: RouterTrace | None = None
        self._replay_handles: list = []
        # sequence parallelism: each tensor-parallel rank routes a contiguous shard of the sequence (rank r holds
        # positions r * S_loc ... (r + 1) * S_loc - 1); traces are gathered so every rank holds the full sequence,
        # as its loss does
        self.sp_group = None
        self.sp_rank, self.sp_size = 0, 1
        if config.sequence_parallel and _world("get_tensor_model_parallel_world_size") > 1:
            from megatron.core import parallel_state

            self.sp_group = parallel_state.get_tensor_model_parallel_group()
            self.sp_rank = parallel_state.get_tensor_model_parallel_rank()
            self.sp_size = parallel_state.get_tensor_model_parallel_world_size()

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for r in self.routers for p in r.parameters(recurse=False)]

    def freeze(self) -> None:
        """Routing control ``freeze`` (before the model is wrapped for data parallelism and given to the
        optimizer, which both read ``requires_grad`` once)."""
        for p in self.router_parameters():
            p.requires_grad_(False)

    @property
    def replaying(self) -> bool:
        return self._replay is not None

    # ---------------------------------------------------------------- hooks
    def _logits(self, layer: int, hidden: Tensor, grad: bool) -> Tensor:
        """Router logits ``(S * B, E)`` of the MoE layer's input ``[S, B, H]``, as ``Router.gating`` computes
        them, in float32 (float64 for fp64 routers or float64 weights)."""
        r = self.routers[layer]
        dt = torch.float64 if r.weight.dtype == torch.float64 else self.logits_dtype
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x = hidden.reshape(-1, hidden.shape[-1]).to(dt)
            bias = None if r.bias is None else r.bias.to(dt)
            return torch.nn.functional.linear(x, r.weight.to(dt), bias)

    def _gather_seq(self, t: Tensor) -> Tensor:
        """Sequence-first rows of this rank's shard ``(S_loc * B, ...)`` -> the full sequence's ``(S * B, ...)``
        (no gradient; identity without sequence parallelism)."""
        if self.sp_group is None:
            return t
        with torch.no_grad():
            out = torch.empty((t.shape[0] * self.sp_size, *t.shape[1:]), dtype=t.dtype, device=t.device)
            torch.distributed.all_gather_into_tensor(out, t.contiguous(), group=self.sp_group)
        return out

    def _own_top_k(self, logits: Tensor, k: int) -> Tensor:
        """The router's own top-k from its logits (softmax and sigmoid are monotone in the logit)."""
        return logits.detach().topk(k, dim=-1).indices

    def _experts(self, routing_map: Tensor, layer: int) -> Tensor:
        """``routing_map`` ``(N, E)`` -> the experts used ``(N, k)`` (ascending expert id)."""
        counts = routing_map.sum(-1)
        if not bool((counts == self.model_top_k).all()):
            raise RuntimeError(
                f"MoE layer {layer}: routing_map has {int(counts.min())}..{int(counts.max())} experts per token, "
                f"expected moe_router_topk={self.model_top_k} (token dropping?)"
            )
        return routing_map.nonzero()[:, 1].reshape(-1, self.model_top_k)

    @staticmethod
    def _to_bs(t: Tensor, s: int, b: int) -> Tensor:
        """Sequence-first ``(S * B, ...)`` -> ``(B, S, ...)``."""
        return t.reshape(s, b, *t.shape[1:]).transpose(0, 1)

    @contextlib.contextmanager
    def _hooks(self, on_logits, on_map) -> Iterator[None]:
        """``on_logits(layer, hidden)`` before each MoE layer (returns state), ``on_map(layer, state,
        routing_map)`` after its router (not in a backward recompute)."""
        state: dict[int, Any] = {}
        handles = []

        def pre(layer: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                state[layer] = on_logits(layer, args[0] if args else kwargs["hidden_states"])

            return hook

        def post(layer: int):
            def hook(module: nn.Module, inputs: tuple, output: tuple) -> None:
                if _in_backward():
                    return
                if layer not in state:
                    raise RuntimeError(f"MoE layer {layer}: its router ran without the layer's forward pre-hook")
                on_map(layer, state.pop(layer), output[1])

            return hook

        try:
            for i, (m, r) in enumerate(zip(self.layers, self.routers, strict=True)):
                handles.append(m.register_forward_pre_hook(pre(i), with_kwargs=True))
                handles.append(r.register_forward_hook(post(i)))
            yield
        finally:
            for h in handles:
                h.remove()

    # ---------------------------------------------------------------- capture / gather
    @contextlib.contextmanager
    def capture(
        self,
        positions: Positions = None,
        weights: bool = False,
        chunks: Literal["sequence", "batch"] = "batch",
        logp: bool = True,
    ) -> Iterator[_Recorder]:
        """Record each token's experts and router log-probs at them (``.trace`` on exit); several forwards in
        one context are concatenated along the batch (``chunks='batch'``: micro-batches)."""
        if weights:
            raise ConfigError(f"routing.control=replay_logits: {NO_LOGITS_REPLAY}")
        if chunks != "batch":
            raise ValueError("Megatron-Core capture concatenates micro-batches (chunks='batch') only")
        rec = _Recorder(self.num_layers, positions, concat_dim=0)

        def on_logits(layer: int, hidden: Tensor) -> tuple:
            logits = self._gather_seq(self._logits(layer, hidden, grad=False))
            return logits, hidden.shape[0] * self.sp_size, hidden.shape[1]

        def on_map(layer: int, state: tuple, routing_map: Tensor) -> None:
            logits, s, b = state
            with torch.no_grad():
                if self.top_k == self.model_top_k and not self.replaying:
                    sel = self._gather_seq(self._experts(routing_map, layer))
                else:
                    sel = self._own_top_k(logits, self.top_k)
                lp = router_log_probs_at(self.score, logits, sel, self.prob) if logp else sel[:, :0].float()
                sel, lp = self._to_bs(sel, s, b), self._to_bs(lp, s, b)
                if positions is not None:
                    sel, lp = sel[:, positions], lp[:, positions]
                rec.idx[layer].append(sel.to(self.idx_dtype))
                rec.logp[layer].append(lp if lp.dtype == torch.float64 else lp.float())

        with self._hooks(on_logits, on_map):
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
        """In the training forward: the current router's log-probs at the trace's experts (``.trace.logp``,
        with gradient only for ``keep_grad``) and the experts the current router itself picks (``topk_idx``)."""
        rec = _Recorder(self.num_layers, positions, concat_dim=0)
        offsets = [0] * self.num_layers

        def on_logits(layer: int, hidden: Tensor) -> tuple:
            s, b = hidden.shape[0] * self.sp_size, hidden.shape[1]
            logits = self._gather_seq(self._logits(layer, hidden, grad=keep_grad))
            logits_bs = self._to_bs(logits, s, b)
            if positions is not None:
                logits_bs = logits_bs[:, positions]
            start = offsets[layer] if chunks == "batch" else 0
            stored = trace.topk_idx[start : start + b, :, layer] if chunks == "batch" else trace.topk_idx[:, :, layer]
            if tuple(stored.shape[:2]) != tuple(logits_bs.shape[:2]):
                raise ValueError(
                    f"trace has {tuple(stored.shape[:2])} (B, T) tokens at MoE layer {layer}, the forward "
                    f"{tuple(logits_bs.shape[:2])}: select the trace rows/positions of this micro-batch"
                )
            bb, t, e = logits_bs.shape
            flat = logits_bs.reshape(bb * t, e)
            lp = router_log_probs_at(self.score, flat, stored.reshape(bb * t, -1).long(), self.prob)
            own = None
            if self.top_k != self.model_top_k or self.replaying:
                own = self._own_top_k(flat, self.top_k).reshape(bb, t, -1)
            offsets[layer] += b
            return lp.reshape(bb, t, -1), own, s, b

        def on_map(layer: int, state: tuple, routing_map: Tensor) -> None:
            lp, own, s, b = state
            if own is None:
                own = self._to_bs(self._gather_seq(self._experts(routing_map.detach(), layer)), s, b)
                if positions is not None:
                    own = own[:, positions]
            rec.logp[layer].append(lp)
            rec.idx[layer].append(own.to(self.idx_dtype))

        with self._hooks(on_logits, on_map):
            yield rec
        rec.finish()

    # ---------------------------------------------------------------- routing replay
    def start_replay(self, trace: RouterTrace, mode: ReplayMode = "indices") -> None:
        """Replay ``trace`` (every position of exactly the next forwards' batch) through Megatron-Core's
        ``RouterReplay`` until :meth:`stop_replay`."""
        if mode != "indices":
            raise ConfigError(f"routing.control=replay_logits: {NO_LOGITS_REPLAY}")
        if trace.topk_idx.shape[-1] != self.model_top_k:
            raise ValueError(
                f"replay needs moe_router_topk={self.model_top_k} experts per layer in the trace, got "
                f"K={trace.topk_idx.shape[-1]}"
            )
        if trace.topk_idx.shape[2] != self.num_layers:
            raise ValueError(f"replay trace has {trace.topk_idx.shape[2]} MoE layers, the model {self.num_layers}")
        for r in self.routers:
            if getattr(r, "router_replay", None) is None:
                raise ConfigError("Megatron-Core moe_enable_routing_replay=False: routing replay needs it True")
        self.stop_replay()
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self._replay = trace
        for r in self.routers:
            r.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        # each layer's target is set right before it routes (registered before any capture hook, so first)
        self._replay_handles = [
            m.register_forward_pre_hook(self._replay_pre_hook(i), with_kwargs=True) for i, m in enumerate(self.layers)
        ]

    def _replay_pre_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._set_replay_target(layer, args[0] if args else kwargs["hidden_states"])

        return hook

    def _set_replay_target(self, layer: int, hidden: Tensor) -> None:
        trace = self._replay
        s_loc, b = hidden.shape[0], hidden.shape[1]
        s = s_loc * self.sp_size
        stored = trace.topk_idx[:, :, layer]  # (B, S, k)
        if tuple(stored.shape[:2]) != (b, s):
            raise ValueError(
                f"replay trace has {tuple(stored.shape[:2])} (B, S) tokens at MoE layer {layer}, the forward "
                f"({b}, {s}): replay needs a full-sequence trace of exactly this batch"
            )
        shard = slice(self.sp_rank * s_loc, (self.sp_rank + 1) * s_loc)  # this rank's positions
        idx = stored[:, shard].long()  # (B, S_loc, k)
        if trace.known is not None:  # positions without a record keep the router's own experts
            own = self._own_top_k(self._logits(layer, hidden, grad=False), self.model_top_k)
            idx = torch.where(trace.known[:, shard, None], idx, self._to_bs(own, s_loc, b))
        target = idx.transpose(0, 1).reshape(s_loc * b, -1).to(hidden.device)  # sequence-first, as the router
        rr = self.routers[layer].router_replay
        rr.clear_indices()
        rr.set_target_indices(target)

    def stop_replay(self) -> None:
        for h in self._replay_handles:
            h.remove()
        self._replay_handles = []
        if self._replay is not None:
            for r in self.routers:
                r.router_replay.clear_router_replay_action()
                r.router_replay.clear_indices()
        self._replay = None


def unpack_packed(packed: Tensor, cu_seqlens: Tensor | list[int], seq_len: int, fill: float | int = 0) -> Tensor:
    """A packed (THD) row ``(1, T_total, ...)`` -> right-padded rows ``(B, seq_len, ...)``: sequence i is
    ``packed[0, cu_seqlens[i]:cu_seqlens[i + 1]]`` (the engine's cumulative lengths, padded ones included if it
    pads each sequence). For a router trace's ``topk_idx``/``logp`` and the log-probs alike."""
    cu = [int(c) for c in cu_seqlens]
    if packed.dim() < 2 or packed.shape[0] != 1:
        raise ValueError(f"a packed tensor is (1, T_total, ...), got shape {tuple(packed.shape)}")
    if cu[0] != 0 or any(b < a for a, b in itertools.pairwise(cu)) or cu[-1] > packed.shape[1]:
        raise ValueError(f"cu_seqlens {cu} must start at 0, not decrease and end within T_total={packed.shape[1]}")
    if max(b - a for a, b in itertools.pairwise(cu)) > seq_len:
        raise ValueError(f"a packed sequence is longer than seq_len={seq_len}")
    out = torch.full((len(cu) - 1, seq_len, *packed.shape[2:]), fill, dtype=packed.dtype, device=packed.device)
    for i, (a, b) in enumerate(itertools.pairwise(cu)):
        out[i, : b - a] = packed[0, a:b]
    return out


def megatron_routing_step(model: nn.Module, options: Options, log: bool | None = None) -> RoutingStep:
    """rspo's routing step (:class:`rspo.routing.RoutingStep`) on a Megatron-Core model, with the run's
    options: the same gamma, replay controls and router metrics as ``rspo train``. The model's config is
    checked against them (:func:`check_config`)."""
    ro = options.routing_options(log=log)
    if ro.control == "replay_logits":
        raise ConfigError(f"{options.names.control}=replay_logits: {NO_LOGITS_REPLAY}")
    replay = ro.control in ("replay_indices", "replay_rollout")
    routers = MegatronRouters(model, ro.top_k, ro.prob, replay=replay, keep_grad=not ro.stop_gradient)
    return RoutingStep(model, ro, routers=routers)


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    options: Options,
    router_shift: Tensor | None = None,
    rollout_weights: Tensor | None = None,
    num_microbatches: int = 1,
    global_count: float | None = None,
    dp_size: int = 1,
    norm_length: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The objective of ``options`` on one micro-batch, in the two-value form a Megatron-Core loss function
    returns, ``(loss, metrics)``, normalised for Megatron's loop: the schedule divides a 2-tuple loss by
    ``num_microbatches`` and data-parallel training averages gradients over the ``dp_size`` ranks.

    - ``global_count=None``: the micro-batch's own mean (what verl's Megatron actor does): the step minimises
      the mean over micro-batches and ranks, equal to the mini-batch objective when every micro-batch holds
      as many sequences (tokens, for ``loss_agg='token-mean'``).
    - ``global_count``: the mini-batch's number of sequences with a response token (tokens with
      ``token-mean``) over all micro-batches and ranks; the loss is scaled by
      ``local / global_count * num_microbatches * dp_size`` so that the step minimises exactly the objective
      of the whole mini-batch, however the micro-batches are filled.

    ``log_probs`` ``(B, T)``: the current policy's log-probs of the response tokens (with gradient, e.g.
    ``-vocab_parallel_cross_entropy(logits, labels)``), in the same layout as ``response_mask`` and gamma.
    """
    if num_microbatches < 1 or dp_size < 1:
        raise ValueError(f"num_microbatches={num_microbatches} and dp_size={dp_size} must be >= 1")
    hp = options.objective_hparams(norm_length=norm_length if norm_length is not None else float(log_probs.shape[-1]))
    name = options.objective.name
    if options.shift and router_shift is None:
        raise ValueError(f"objective {name!r} with router shift needs router_shift (gamma from the routing step)")
    if not options.shift and router_shift is not None:
        raise ValueError(f"router_shift is given but router shift is off for objective {name!r}")
    reduce = "geometric" if rollout_weights is not None and get_objective(name).level == "sequence" else None
    loss, metrics = compute_policy_loss(
        name,
        log_probs,
        old_log_probs,
        advantages,
        response_mask,
        router_shift=router_shift,
        rollout_weights=rollout_weights,
        rollout_weights_reduce=reduce,
        **hp,
    )
    if global_count is not None:
        if not global_count > 0:
            raise ValueError(f"global_count must be > 0, got {global_count}")
        local = aggregation_count(response_mask, hp.get("loss_agg")).to(loss.dtype)
        loss = loss * (local / global_count * num_microbatches * dp_size)
    return loss, metrics


__all__ = ["MegatronRouters", "check_config", "megatron_routing_step", "policy_loss", "unpack_packed"]
