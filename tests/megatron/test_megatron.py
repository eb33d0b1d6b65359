"""rspo.integrations.megatron on a tiny Megatron-Core GPTModel with MoE layers, on CPU (``make test-megatron``,
in its own environment: Megatron-Core 0.16.x next to CPU torch; the CPU patches are in mcore_cpu.py)."""

from __future__ import annotations

import copy
import itertools
import types

import pytest
import torch

from rspo.errors import ConfigError
from rspo.integrations.megatron import (
    MegatronRouters,
    check_config,
    megatron_routing_step,
    policy_loss,
    unpack_packed,
)
from rspo.objectives import compute_policy_loss
from rspo.options import ObjectiveOptions, Options, RouterShiftOptions
from rspo.routing import MoERouters, OldTrace, RoutingOptions, RoutingStep, router_gamma
from tests import naive
from tests.megatron import mcore_cpu as h

B, S, V = 3, 10, 48
RESP = slice(4, 9)  # logits at positions 4..8 score tokens 5..9


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))


def model(dtype=torch.float64, seed: int = 0, **config):
    return h.tiny_gpt(h.tiny_config(**config), vocab_size=V, seed=seed, dtype=dtype)


def routers_of(m) -> list:
    return [mod for mod in m.modules() if type(mod).__name__ == "TopKRouter"]


class Spy:
    """The test's own record of each router's input ``[S, B, H]`` and ``routing_map`` (independent of rspo)."""

    def __init__(self, m) -> None:
        self.inputs: list[list[torch.Tensor]] = []
        self.maps: list[list[torch.Tensor]] = []
        self.handles = []
        for i, r in enumerate(routers_of(m)):
            self.inputs.append([])
            self.maps.append([])
            self.handles.append(r.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(module, args, output):
            if torch._C._current_graph_task_id() != -1:  # a recompute in backward
                return
            self.inputs[i].append(args[0].detach().clone())
            self.maps[i].append(output[1].detach().clone())

        return hook

    def remove(self) -> None:
        for hd in self.handles:
            hd.remove()


def experts_bs(routing_map: torch.Tensor, k: int) -> torch.Tensor:
    """``routing_map`` ``[S * B, E]`` -> the sorted experts ``(B, S, k)`` (loops, no reshape tricks)."""
    out = torch.zeros(B, S, k, dtype=torch.long)
    for s in range(S):
        for b in range(B):
            out[b, s] = torch.tensor(sorted(routing_map[s * B + b].nonzero().flatten().tolist()))
    return out


def naive_logp(hidden: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, score: str = "softmax", renorm=False):
    """log r at experts ``idx`` ``(B, S, K)`` from the router's input ``[S, B, H]`` and weight, per token."""
    out = torch.zeros(idx.shape, dtype=torch.float64)
    for b in range(idx.shape[0]):
        for s in range(idx.shape[1]):
            z = weight.double() @ hidden[s, b].double()  # (E,)
            lp = torch.nn.functional.logsigmoid(z) if score == "sigmoid" else z - torch.logsumexp(z, 0)
            sel = lp[idx[b, s]]
            out[b, s] = sel - torch.logsumexp(sel, 0) if renorm else sel
    return out


def opts(objective="rspo", control="none", **shift) -> Options:
    return Options(ObjectiveOptions(objective), RouterShiftOptions(**shift), control=control)


def nudge_routers(m, scale: float, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routers_of(m):
            r.weight.add_(torch.randn(r.weight.shape, generator=g, dtype=r.weight.dtype) * scale)


def replayed_update(m, step, old, ids):
    """One training forward and backward through the routing step (replaying if it does), watched by a Spy."""
    spy = Spy(m)
    with step.forward(old, RESP) as cur:
        logits = h.forward(m, ids)
    logits.sum().backward()
    step.end()
    spy.remove()
    return cur, spy


# ------------------------------------------------------------------------------------------------- capture
@pytest.mark.parametrize(
    ("score", "prob", "topk_k"),
    [("softmax", "full", None), ("softmax", "topk_renorm", None), ("sigmoid", "full", None), ("softmax", "full", 3)],
)
def test_capture_equals_routing_map_and_an_independent_router_computation(ids, score, prob, topk_k):
    extra = {"moe_router_pre_softmax": True} if score == "softmax" and prob == "full" and topk_k is None else {}
    m = model(moe_router_score_function=score, **extra)
    step = megatron_routing_step(m, opts(prob=prob, top_k=topk_k))
    spy = Spy(m)
    with torch.no_grad(), step.capture(None) as rec:
        h.forward(m, ids)
    spy.remove()
    trace = rec.trace
    k = topk_k or 2
    assert trace.topk_idx.shape == (B, S, 2, k) and trace.topk_idx.dtype == torch.uint8
    assert trace.logp.dtype == torch.float64
    for layer, r in enumerate(routers_of(m)):
        hidden = spy.inputs[layer][0]
        if topk_k is None:  # the experts Megatron used
            want = experts_bs(spy.maps[layer][0], 2)
        else:  # K other than the model's: the top-K of the router's own logits
            z = torch.einsum("sbh,eh->bse", hidden, r.weight)
            want = z.topk(k, dim=-1).indices.sort(-1).values
        got = trace.topk_idx[:, :, layer].long()
        assert torch.equal(got.sort(-1).values, want)
        ref = naive_logp(hidden, r.weight, got, score, renorm=prob == "topk_renorm")
        torch.testing.assert_close(trace.logp[:, :, layer], ref, rtol=0, atol=1e-12)


def test_capture_at_response_positions_and_micro_batches_concatenate(ids):
    m = model()
    step = megatron_routing_step(m, opts())
    with torch.no_grad(), step.capture(None) as whole:
        h.forward(m, ids)
    with torch.no_grad(), step.capture(RESP) as parts:
        h.forward(m, ids[:1])
        h.forward(m, ids[1:])
    assert torch.equal(parts.trace.topk_idx, whole.trace.topk_idx[:, RESP])
    torch.testing.assert_close(parts.trace.logp, whole.trace.logp[:, RESP], rtol=0, atol=1e-12)


def test_a_packed_row_traces_like_its_sequences_run_alone(ids):
    """Packing (THD) as a block-diagonal causal mask with positions restarting per sequence (Megatron's packed
    attention needs Transformer Engine): the packed row's trace, unpacked, equals each sequence's own."""
    m = model()
    step = megatron_routing_step(m, opts())
    lens = [10, 6, 8]
    seqs = [ids[0, :10], ids[1, :6], ids[2, :8]]
    cu = [0, 10, 16, 24]
    packed = torch.cat(seqs)[None]  # (1, 24)
    mask = torch.ones(24, 24, dtype=torch.bool)
    for a, b in itertools.pairwise(cu):
        mask[a:b, a:b] = torch.triu(torch.ones(b - a, b - a, dtype=torch.bool), diagonal=1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad(), step.capture(None) as rec:
        m(input_ids=packed, position_ids=pos, attention_mask=mask[None, None])
    got = unpack_packed(rec.trace.topk_idx, cu, 10)
    got_lp = unpack_packed(rec.trace.logp, cu, 10, fill=float("nan"))
    for i, seq in enumerate(seqs):
        with torch.no_grad(), step.capture(None) as alone:
            h.forward(m, seq[None])
        n = lens[i]
        assert torch.equal(got[i, :n].sort(-1).values, alone.trace.topk_idx[0].sort(-1).values)
        order = lambda t: t.sort(-1).values  # noqa: E731  (experts in ascending id: logp in that order)
        torch.testing.assert_close(order(got_lp[i, :n]), order(alone.trace.logp[0]), rtol=0, atol=1e-10)
        assert bool(torch.isnan(got_lp[i, n:]).all())
    with pytest.raises(ValueError, match="cu_seqlens"):
        unpack_packed(rec.trace.topk_idx, [0, 12, 11], 12)


# ------------------------------------------------------------------------------------------------- gamma
def test_gamma_is_exactly_one_with_unchanged_weights_and_below_one_after_the_router_moves(ids):
    m = model(dtype=torch.float32)  # the training precision: exact equality still holds
    o = opts()
    step = megatron_routing_step(m, o)
    with torch.no_grad(), step.capture(RESP) as rec:
        h.forward(m, ids)
    old = step.old_trace(rec.trace, RESP)
    with step.forward(old, RESP) as cur:
        h.forward(m, ids)
    step.end()
    gamma = step.gamma(old, cur.trace)
    assert gamma.shape == (B, RESP.stop - RESP.start)
    assert bool((gamma == 1).all())
    assert step.metrics(old, cur.trace, gamma, torch.ones_like(gamma))["router/non_shifted_ratio"] == 1.0

    nudge_routers(m, 0.05)
    with step.forward(old, RESP) as cur:
        h.forward(m, ids)
    step.end()
    gamma = step.gamma(old, cur.trace)
    assert not gamma.requires_grad
    assert float(gamma.max()) < 1 and float(gamma.min()) > 0.5  # moved, above the floor
    ref = naive.router_shift(old.trace.logp.double().tolist(), cur.trace.logp.double().tolist())
    torch.testing.assert_close(gamma.double(), torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------- replay
def test_r2_replay_reproduces_the_old_experts_in_every_layer_and_the_router_keeps_its_gradient(ids):
    m = model(moe_enable_routing_replay=True)
    step = megatron_routing_step(m, opts(control="replay_indices"))
    with torch.no_grad(), step.capture(RESP) as rec:
        h.forward(m, ids)
    old = step.old_trace(rec.trace, RESP)
    assert old.full is not None and old.full.topk_idx.shape == (B, S, 2, 2)
    nudge_routers(m, 2.0)  # most tokens change their own top-2
    cur, spy = replayed_update(m, step, old, ids)
    own_changed = 0
    for layer in range(2):
        used = experts_bs(spy.maps[layer][0], 2)
        assert torch.equal(used, old.full.topk_idx[:, :, layer].long().sort(-1).values)  # replayed, every token
        own = cur.trace.topk_idx[:, :, layer].long().sort(-1).values  # the router's own choice (diagnostics)
        own_changed += int((own != old.trace.topk_idx[:, :, layer].long().sort(-1).values).any(-1).sum())
    assert own_changed > B * 5  # the replay overrode real changes
    for r in routers_of(m):
        assert float(r.weight.grad.abs().sum()) > 0
        assert r.router_replay.router_replay_action is None and r.router_replay.target_topk_idx is None
    # after end(): the router routes by itself again
    spy = Spy(m)
    with torch.no_grad():
        h.forward(m, ids)
    spy.remove()
    assert not torch.equal(experts_bs(spy.maps[0][0], 2), old.full.topk_idx[:, :, 0].long().sort(-1).values)


def test_r3_replays_given_rollout_experts_and_unknown_positions_keep_the_routers_choice(ids):
    m = model(moe_enable_routing_replay=True)
    step = megatron_routing_step(m, opts(control="replay_rollout"))
    g = torch.Generator().manual_seed(3)
    rollout = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(B * (S - 1) * 2)]).reshape(B, S - 1, 2, 2)
    spy = Spy(m)
    with torch.no_grad(), step.capture(RESP, rollout=rollout) as rec:
        h.forward(m, ids)
    spy.remove()
    old = step.old_trace(rec.trace, RESP, rollout=rollout)
    for layer in range(2):
        used = experts_bs(spy.maps[layer][0], 2)
        assert torch.equal(used[:, : S - 1], rollout[:, :, layer].sort(-1).values)
        ref = naive_logp(spy.inputs[layer][0][RESP], routers_of(m)[layer].weight, rollout[:, RESP, layer])
        torch.testing.assert_close(old.trace.logp[:, :, layer], ref, rtol=0, atol=1e-12)  # old router, R3 experts

    # a trace with unknown positions (a rollout engine that dropped the prompt's routing)
    from rspo.routing.capture import RouterTrace

    known = torch.zeros(B, S, dtype=torch.bool)
    known[:, 3:] = True
    full = RouterTrace(old.full.topk_idx, old.full.logp, known=known)
    routers = step.routers
    spy = Spy(m)
    routers.start_replay(full)
    with torch.no_grad():
        h.forward(m, ids)
    routers.stop_replay()
    spy.remove()
    for layer, r in enumerate(routers_of(m)):
        used = experts_bs(spy.maps[layer][0], 2)
        assert torch.equal(used[:, 3 : S - 1], rollout[:, 3:, layer].sort(-1).values)
        own = torch.einsum("sbh,eh->bse", spy.inputs[layer][0], r.weight).topk(2, -1).indices.sort(-1).values
        assert torch.equal(used[:, :3], own[:, :3])


# ------------------------------------------------------------------------------------------------- the loss
def policy_inputs(logits: torch.Tensor, ids: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(logits[:, RESP].double(), -1).gather(-1, ids[:, 5:10, None]).squeeze(-1)  # (B, T)
    old = (lp.detach() + 0.05 * torch.randn(lp.shape, generator=g, dtype=torch.float64)).clamp(max=0)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones_like(lp)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return lp, old, adv, mask


@pytest.mark.parametrize("objective", ["rspo", "grpo", "gspo"])
def test_loss_equals_compute_policy_loss_and_megatrons_micro_batch_rule_gives_the_mini_batch_objective(ids, objective):
    from megatron.core.pipeline_parallel import schedules

    m = model()
    o = opts(objective)
    step = megatron_routing_step(m, o)
    with torch.no_grad(), step.capture(RESP) as rec:
        h.forward(m, ids)
    old_trace = step.old_trace(rec.trace, RESP)
    nudge_routers(m, 0.05)

    # the whole mini-batch at once: compute_policy_loss on the same tensors
    with step.forward(old_trace, RESP) as cur:
        logits = h.forward(m, ids)
    lp, old, adv, mask = policy_inputs(logits, ids)
    gamma = step.gamma(old_trace, cur.trace).double() if o.shift else None
    ours, metrics = policy_loss(lp, old, adv, mask, options=o, router_shift=gamma)
    ref, ref_metrics = compute_policy_loss(objective, lp, old, adv, mask, router_shift=gamma, **o.objective_hparams())
    assert abs(float(ours) - float(ref)) < 1e-12 and metrics == ref_metrics
    ref.backward()
    want = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()

    # two unequal micro-batches through Megatron's own loss rule (forward_step_calc_loss: a 2-tuple loss is
    # divided by num_microbatches; the schedule itself allocates on cuda, so its per-micro-batch step is used)
    n_seq = float((mask.sum(-1) > 0).sum())
    for rows in (slice(0, 1), slice(1, 3)):
        with step.forward(old_trace[rows], RESP) as cur:
            out = h.forward(m, ids[rows])

        def loss_func(output, rows=rows, cur=cur):
            lp_mb = torch.log_softmax(output[:, RESP].double(), -1).gather(-1, ids[rows, 5:10, None]).squeeze(-1)
            g_mb = step.gamma(old_trace[rows], cur.trace).double() if o.shift else None
            return policy_loss(
                lp_mb,
                old[rows],
                adv[rows],
                mask[rows],
                options=o,
                router_shift=g_mb,
                num_microbatches=2,
                global_count=n_seq,
            )

        loss, *_ = schedules.forward_step_calc_loss(
            m, out, loss_func, m.config, None, False, 2, [], cp_group_size=1, is_last_stage=True
        )
        loss.backward()
        step.end()
    for p, w in zip(m.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-9, atol=1e-12)


def test_gradient_reaches_the_router_but_not_through_gamma(ids):
    m = model()
    o = opts()
    step = megatron_routing_step(m, o)
    with torch.no_grad(), step.capture(RESP) as rec:
        h.forward(m, ids)
    old_trace = step.old_trace(rec.trace, RESP)
    nudge_routers(m, 0.05)

    def router_grads(gamma_of):
        m.zero_grad()
        with step.forward(old_trace, RESP) as cur:
            logits = h.forward(m, ids)
        lp, old, adv, mask = policy_inputs(logits, ids)
        gamma = gamma_of(cur)
        loss, _ = policy_loss(lp, old, adv, mask, options=o, router_shift=gamma)
        loss.backward()
        step.end()
        return [r.weight.grad.clone() for r in routers_of(m)], gamma

    grads, gamma = router_grads(lambda cur: step.gamma(old_trace, cur.trace).double())
    assert not gamma.requires_grad and float(gamma.min()) < 1
    assert all(float(g.abs().sum()) > 0 for g in grads)
    const, _ = router_grads(lambda cur: gamma.clone())  # gamma as a plain constant: the same gradient
    for a, b in zip(grads, const, strict=True):
        assert torch.equal(a, b)

    # the ablation (stop_gradient=False): gamma carries a gradient into the router, which changes it
    o2 = opts(stop_gradient=False)
    step2 = megatron_routing_step(m, o2)
    m.zero_grad()
    with step2.forward(old_trace, RESP) as cur:
        logits = h.forward(m, ids)
    g2 = step2.gamma(old_trace, cur.trace)
    assert g2.requires_grad
    lp, old, adv, mask = policy_inputs(logits, ids)
    loss, _ = policy_loss(lp, old, adv, mask, options=o2, router_shift=g2.double())
    loss.backward()
    step2.end()
    assert any(not torch.allclose(r.weight.grad, g, atol=1e-9) for r, g in zip(routers_of(m), grads, strict=True))


# ------------------------------------------------------------------------------------------------- recompute
def test_selective_recompute_of_the_moe_module_gives_the_same_trace_gamma_and_gradients(ids):
    base = model(moe_enable_routing_replay=True)
    rec_model = model(moe_enable_routing_replay=True, recompute_granularity="selective", recompute_modules=["moe"])
    rec_model.load_state_dict(base.state_dict())
    assert rec_model.decoder.layers[0].mlp.moe_layer_recompute
    results = []
    for m in (base, rec_model):
        for o in (opts(), opts(control="replay_indices"), opts(stop_gradient=False)):
            step = megatron_routing_step(m, o)
            with torch.no_grad(), step.capture(RESP) as rec:
                h.forward(m, ids)
            old_trace = step.old_trace(rec.trace, RESP)
            nudge_routers(m, 0.05, seed=11)
            m.zero_grad()
            with step.forward(old_trace, RESP) as cur:
                logits = h.forward(m, ids)
            lp, old, adv, mask = policy_inputs(logits, ids)
            gamma = step.gamma(old_trace, cur.trace).double()
            loss, _ = policy_loss(lp, old, adv, mask, options=o, router_shift=gamma)
            loss.backward()
            step.end()
            nudge_routers(m, -0.05, seed=11)  # back to the shared weights
            results.append((rec.trace.topk_idx, gamma.detach(), [p.grad.clone() for p in m.parameters()]))
    for (i0, g0, p0), (i1, g1, p1) in zip(results[:3], results[3:], strict=True):
        assert torch.equal(i0, i1)
        torch.testing.assert_close(g0, g1, rtol=0, atol=1e-12)
        for a, b in zip(p0, p1, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"recompute_granularity": "full"}, "recompute_granularity='full'"),
        ({"moe_input_jitter_eps": 0.01}, "moe_input_jitter_eps"),
        ({"moe_router_force_load_balancing": True}, "moe_router_force_load_balancing"),
        ({"moe_router_load_balancing_type": "sinkhorn"}, "moe_router_load_balancing_type='sinkhorn'"),
        ({"moe_expert_capacity_factor": 1.0}, "moe_expert_capacity_factor"),
        ({"mtp_num_layers": 1}, "mtp_num_layers"),
        ({"cuda_graph_impl": "local"}, "cuda_graph_impl='local'"),
        ({"context_parallel_size": 2}, "context_parallel_size>1"),
        ({"pipeline_model_parallel_size": 2}, "pipeline_model_parallel_size>1"),
        ({"virtual_pipeline_model_parallel_size": 2}, "virtual_pipeline_model_parallel_size"),
    ],
)
def test_each_unsupported_megatron_option_is_an_error_naming_it(changes, named):
    config = copy.copy(model().config)
    check_config(config, replay=False, own_top_k=False)  # the tiny model's own config passes
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(ConfigError, match="Megatron-Core " + named.replace("(", r"\(")):
        check_config(config, replay=False, own_top_k=False)


def test_replay_and_top_k_options_are_checked_against_the_model_by_name():
    with pytest.raises(ConfigError, match="moe_enable_routing_replay=False"):
        megatron_routing_step(model(), opts(control="replay_indices"))
    with pytest.raises(ConfigError, match="routing.control=replay_logits"):
        megatron_routing_step(model(moe_enable_routing_replay=True), opts(control="replay_logits"))
    config = copy.copy(model(moe_enable_routing_replay=True).config)
    config.moe_router_fusion = True
    with pytest.raises(ConfigError, match="moe_router_fusion"):
        check_config(config, replay=True, own_top_k=True)
    config = copy.copy(model().config)
    config.moe_router_group_topk = 2
    with pytest.raises(ConfigError, match="moe_router_group_topk"):
        check_config(config, replay=False, own_top_k=True)
    check_config(config, replay=False, own_top_k=False)  # capture alone reads routing_map: fine
    with pytest.raises(ValueError, match=r"replay_rollout replays the rollout's 2 experts per layer"):
        megatron_routing_step(model(moe_enable_routing_replay=True), opts(control="replay_rollout", top_k=3))
    config = copy.copy(model().config)
    config.tensor_model_parallel_size, config.sequence_parallel = 2, True
    check_config(config, replay=False, own_top_k=False)  # sequence shards are gathered
    with pytest.raises(ConfigError, match="sequence_parallel with tensor_model_parallel_size>1"):
        check_config(config, replay=False, own_top_k=False, keep_grad=True)
    with pytest.raises(ValueError, match="router_shift is given but router shift is off"):
        policy_loss(
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            torch.zeros(1),
            torch.ones(1, 2),
            options=opts("grpo"),
            router_shift=torch.ones(1, 2),
        )


def test_freeze_stops_the_router_gradient(ids):
    m = model()
    step = megatron_routing_step(m, opts(objective="grpo", control="freeze"))
    assert all(not r.weight.requires_grad for r in routers_of(m))
    h.forward(m, ids).sum().backward()
    assert all(r.weight.grad is None for r in routers_of(m))
    assert step.routers is not None


# ------------------------------------------------------------------------------------------------- HF pair
class HFRouters(torch.nn.Module):
    """transformers' Qwen3-MoE routers (the real modules) behind a model-shaped shell, fed given router inputs:
    the hand-matched pair of a Megatron model (same router weights, same router inputs per layer)."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

        super().__init__()
        w = weights[0]
        cfg = Qwen3MoeConfig(hidden_size=w.shape[1], num_experts=w.shape[0], num_experts_per_tok=2, norm_topk_prob=True)
        self.config = types.SimpleNamespace(model_type="qwen3_moe")
        self.layers = torch.nn.ModuleList()
        for weight in weights:
            layer = torch.nn.Module()
            layer.mlp = torch.nn.Module()
            layer.mlp.gate = Qwen3MoeTopKRouter(cfg).to(w.dtype)
            with torch.no_grad():
                layer.mlp.gate.weight.copy_(weight)
            self.layers.append(layer)

    def forward(self, input_ids: torch.Tensor, hidden: list[torch.Tensor]) -> None:
        for layer, x in zip(self.layers, hidden, strict=True):  # [S, B, H] -> transformers' (B * S, H)
            layer.mlp.gate(x.transpose(0, 1).reshape(-1, x.shape[-1]))


def test_the_hf_path_and_the_megatron_path_give_the_same_gamma(ids):
    m = model()
    ro = RoutingOptions(shift=True)
    mstep = megatron_routing_step(m, opts())
    spy = Spy(m)
    with torch.no_grad(), mstep.capture(RESP) as rec:
        h.forward(m, ids)
    old_m = mstep.old_trace(rec.trace, RESP)
    hidden_old = [x[0] for x in spy.inputs]
    nudge_routers(m, 0.05)
    with mstep.forward(old_m, RESP) as cur:
        h.forward(m, ids)
    mstep.end()
    spy.remove()
    hidden_new = [x[1] for x in spy.inputs]
    gamma_m = mstep.gamma(old_m, cur.trace)

    hf_old = HFRouters([r.weight for r in routers_of(model())])  # the weights before the nudge
    hstep = RoutingStep(hf_old, ro)
    assert isinstance(hstep.routers, MoERouters)
    with torch.no_grad(), hstep.capture(RESP) as hrec:
        hf_old(input_ids=ids, hidden=hidden_old)
    old_h = hstep.old_trace(hrec.trace, RESP)
    hf_new = HFRouters([r.weight for r in routers_of(m)])
    hstep_new = RoutingStep(hf_new, ro)
    with hstep_new.forward(old_h, RESP) as hcur:
        hf_new(input_ids=ids, hidden=hidden_new)
    gamma_h = router_gamma(ro, OldTrace(old_h.trace), hcur.trace)

    assert torch.equal(old_h.trace.topk_idx.sort(-1).values, old_m.trace.topk_idx.sort(-1).values)
    assert float(gamma_m.min()) < 1
    torch.testing.assert_close(gamma_h, gamma_m, rtol=0, atol=1e-12)
    assert isinstance(mstep.routers, MegatronRouters)


# ------------------------------------------------------------------------------------------------- TP = 2
def _all_gather_seq(t: torch.Tensor) -> torch.Tensor:
    """The test's own gather of sequence shards (``[S_loc, ...]`` in rank order), independent of rspo's."""
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _parallel_worker(rank: int, port: int, tp: int, ep: int) -> None:
    import os

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        h.patch()
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
        m = model(
            tensor_model_parallel_size=tp,
            sequence_parallel=tp > 1,
            expert_model_parallel_size=ep,
            moe_enable_routing_replay=True,
        )
        assert len(m.decoder.layers[0].mlp.experts.local_experts) == 8 // ep  # this rank's experts
        # tensor-parallel ranks share their batch; with tp=1 the two ranks are data-parallel: their own batches
        seed = 1 if tp > 1 else 1 + rank
        ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))
        s_loc = S // tp
        gather = _all_gather_seq if tp > 1 else (lambda t: t)
        step = megatron_routing_step(m, opts(control="replay_indices"))
        spy = Spy(m)
        with torch.no_grad(), step.capture(RESP) as rec:
            h.forward(m, ids)
        spy.remove()
        old = step.old_trace(rec.trace, RESP)
        assert old.full.topk_idx.shape == (B, S, 2, 2)
        for layer, r in enumerate(routers_of(m)):
            local = spy.inputs[layer][0]
            assert local.shape[0] == s_loc  # with sequence parallelism, this rank routed its shard
            hidden = gather(local)  # [S, B, H]
            used = gather(spy.maps[layer][0].reshape(s_loc, B, -1).to(torch.int64)).reshape(S * B, -1)
            want = experts_bs(used.bool(), 2)
            assert torch.equal(old.full.topk_idx[:, :, layer].long().sort(-1).values, want)
            ref = naive_logp(hidden[RESP], r.weight, old.trace.topk_idx[:, :, layer].long())
            torch.testing.assert_close(old.trace.logp[:, :, layer], ref, rtol=0, atol=1e-12)

        nudge_routers(m, 2.0)  # the same nudge on both ranks: routers are replicated
        cur, spy = replayed_update(m, step, old, ids)
        shard = slice(rank * s_loc, (rank + 1) * s_loc) if tp > 1 else slice(0, S)
        changed = 0
        for layer in range(2):
            local_map = spy.maps[layer][0].reshape(s_loc, B, -1)
            for i in range(s_loc):
                for b in range(B):
                    got = sorted(local_map[i, b].nonzero().flatten().tolist())
                    assert got == sorted(old.full.topk_idx[b, shard][i, layer].long().tolist())
            own = cur.trace.topk_idx[:, :, layer].long().sort(-1).values
            changed += int((own != old.trace.topk_idx[:, :, layer].long().sort(-1).values).any(-1).sum())
        assert changed > 0  # the replay overrode real changes
        gamma = step.gamma(old, cur.trace)
        assert float(gamma.min()) < 1
        if tp > 1:
            both = [torch.empty_like(gamma) for _ in range(2)]
            torch.distributed.all_gather(both, gamma)
            assert torch.equal(both[0], both[1])  # every tensor-parallel rank weighs its loss alike
        assert all(float(r.weight.grad.abs().sum()) > 0 for r in routers_of(m))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(("tp", "ep"), [(2, 1), (1, 2)], ids=["tp2-sequence-parallel", "ep2"])
def test_two_parallel_ranks_capture_their_tokens_and_replay(tp, ep):
    """Two gloo processes. tp2: tensor_model_parallel_size=2 with sequence parallelism: each rank's routers see
    half of the sequence; each rank's trace is the whole sequence's (checked against the test's own gather of the
    routers' inputs and routing maps), R2 replays each rank's shard, gamma is identical on both ranks. ep2:
    expert_model_parallel_size=2 (each rank holds 4 of the 8 experts, tokens dispatched across ranks): each
    rank's trace and replay are its own tokens'."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_parallel_worker, args=(port, tp, ep), nprocs=2, join=True)
