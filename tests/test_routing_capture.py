"""Router capture, gather and routing control on every transformers MoE family (tiny random models)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rspo.lab.presets import build_model
from rspo.routing import non_shifted_ratio, router_shift_ratio
from rspo.routing.capture import MoERouters, index_dtype

FAMILIES = ["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-mixtral", "tiny-olmoe", "tiny-gpt-oss", "tiny-deepseek-v3"]
VOCAB = 40


def make(preset: str, seed: int = 0):
    model = build_model(preset, VOCAB, seed=seed)
    routers = MoERouters(model)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # distinct, non-trivial routing (some inits are zero or near-uniform)
        for r in routers.routers:
            r.weight.copy_(0.3 * torch.randn(r.weight.shape, generator=g))
            if hasattr(r, "e_score_correction_bias"):  # DeepSeek-V3's selection-only bias
                r.e_score_correction_bias.copy_(0.3 * torch.randn(r.num_experts, generator=g))
    model.eval()
    return model, routers


def batch(b: int = 3, s: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, s), generator=g)


def output_router_logits(model, routers: MoERouters, x: torch.Tensor):
    """transformers' ``output_router_logits`` (N, E) per MoE layer. DeepSeek-V3 under transformers < 5.11
    (verl's range) returns none: then each gate's raw logits, from its own (original) forward."""
    out = model(x, output_router_logits=True)
    logits = getattr(out, "router_logits", None)
    if logits is None:
        seen: list[torch.Tensor] = []
        hooks = [r.register_forward_hook(lambda m, i, o: seen.append(o[0])) for r in routers.routers]
        model(x)
        for h in hooks:
            h.remove()
        logits = tuple(seen)
    return out, logits


def reference_selection(routers: MoERouters, logits: torch.Tensor, layer: int) -> torch.Tensor:
    """The experts each family activates, computed independently from output_router_logits (N, E)."""
    fam, r = routers.family.model_type, routers.routers[layer]
    k = routers.model_top_k
    if fam == "deepseek_v3":
        s = logits.float().sigmoid() + r.e_score_correction_bias
        n_group, per = r.num_group, r.num_experts // r.num_group
        gs = s.view(-1, n_group, per).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(gs).scatter_(1, gs.topk(r.topk_group, dim=-1).indices, 1.0).bool()
        s = s.masked_fill(~keep.repeat_interleave(per, dim=1), -math.inf)
        return s.topk(k, dim=-1).indices
    return logits.float().topk(k, dim=-1).indices  # softmax is monotone; gpt_oss ranks raw logits


def reference_logp(routers: MoERouters, logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()  # float64 reference, compared at float32 precision
    if routers.family.score == "sigmoid":
        return torch.log(torch.sigmoid(x)).float()
    return torch.log(torch.softmax(x, dim=-1)).float()


def test_split_router_shim_keeps_outputs():
    """transformers < 5.11 (verl's range): DeepSeek-V3's router is adapted to (logits, weights, indices);
    the model's output must not change. With transformers >= 5.11 there is nothing to adapt."""
    import transformers
    from packaging.version import Version

    from rspo.routing.families import adapt_split_routers

    model = build_model("tiny-deepseek-v3", VOCAB, seed=0).eval()
    x = batch()
    with torch.no_grad():
        before = model(x).logits
        n = adapt_split_routers(model)
        after = model(x).logits
    layers = sum(type(m).__name__ == "DeepseekV3MoE" for m in model.modules())
    assert layers >= 1 and n == (layers if Version(transformers.__version__) < Version("5.11") else 0)
    assert torch.equal(before, after)
    assert adapt_split_routers(model) == 0  # once


@pytest.mark.parametrize("preset", FAMILIES)
def test_capture_matches_output_router_logits(preset):
    model, routers = make(preset)
    x = batch()
    with torch.no_grad():
        ref, router_logits = output_router_logits(model, routers, x)
        with routers.capture() as rec:
            out = model(x)
    trace = rec.trace
    b, s = x.shape
    assert trace.topk_idx.shape == (b, s, routers.num_layers, routers.model_top_k)
    assert trace.topk_idx.dtype == torch.uint8
    assert len(router_logits) == routers.num_layers  # dense layers are skipped, not misaligned
    assert torch.equal(out.logits, ref.logits)  # capture changes nothing
    for layer, lg in enumerate(router_logits):
        want = reference_selection(routers, lg, layer).sort(-1).values.view(b, s, -1)
        got = trace.topk_idx[:, :, layer].long().sort(-1).values
        assert torch.equal(got, want), layer
        want_lp = reference_logp(routers, lg).view(b, s, -1).gather(-1, trace.topk_idx[:, :, layer].long())
        torch.testing.assert_close(trace.logp[:, :, layer], want_lp, atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", FAMILIES)
def test_gamma_from_capture_equals_hand_computation(preset):
    old_model, routers_old = make(preset)
    new_model = copy.deepcopy(old_model)
    with torch.no_grad():  # a different parameter set
        for p in new_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    routers_new = MoERouters(new_model)
    x = batch(seed=1)
    resp = slice(3, 8)  # the positions that score a 5-token response
    with torch.no_grad():
        with routers_old.capture(positions=resp) as old:
            old_model(x)
        with routers_new.gather(old.trace, positions=resp) as cur:
            new_model(x)
        ref_old = output_router_logits(old_model, routers_old, x)[1]
        ref_new = output_router_logits(new_model, routers_new, x)[1]
    gamma = router_shift_ratio(old.trace.logp, cur.trace.logp, gamma_min=1e-12)
    # by hand: per layer, the old top-k experts and |log r_new - log r_old| averaged, then exp(-mean over layers)
    b, s = x.shape
    d_layers = []
    for layer, (lo, ln) in enumerate(zip(ref_old, ref_new, strict=True)):
        idx = reference_selection(routers_old, lo, layer).view(b, s, -1)[:, resp]
        lpo = reference_logp(routers_old, lo).view(b, s, -1)[:, resp].gather(-1, idx)
        lpn = reference_logp(routers_old, ln).view(b, s, -1)[:, resp].gather(-1, idx)
        d_layers.append((lpn - lpo).abs().mean(-1))
    want = torch.exp(-torch.stack(d_layers, -1).mean(-1))
    torch.testing.assert_close(gamma, want, atol=1e-6, rtol=0)
    assert gamma.min() < 0.999  # the parameters did change the routing
    # the current pass also records the current router's own choice, for the non-shifted ratio
    cur_sel = torch.stack(
        [reference_selection(routers_new, ln, i).view(b, s, -1)[:, resp] for i, ln in enumerate(ref_new)], 2
    )
    assert torch.equal(cur.trace.topk_idx.long().sort(-1).values, cur_sel.sort(-1).values)
    nsr = non_shifted_ratio(old.trace.topk_idx, cur.trace.topk_idx, torch.ones(b, resp.stop - resp.start))
    assert 0.0 <= nsr <= 1.0


@pytest.mark.parametrize("preset", FAMILIES)
def test_gamma_is_exactly_one_when_unchanged(preset):
    model, routers = make(preset)
    x = batch(seed=2)
    with torch.no_grad(), routers.capture(positions=slice(2, 9)) as old:
        model(x)
    model.train()
    with routers.gather(old.trace, positions=slice(2, 9)) as cur:
        out = model(x)
    assert torch.equal(cur.trace.logp, old.trace.logp)
    assert torch.all(router_shift_ratio(old.trace.logp, cur.trace.logp) == 1.0)
    assert non_shifted_ratio(old.trace.topk_idx, cur.trace.topk_idx, torch.ones(3, 7)) == 1.0
    out.logits.sum().backward()  # the gathered log-probs are detached by default: nothing breaks


@pytest.mark.parametrize("preset", FAMILIES)
def test_replay_is_bit_exact_with_unchanged_parameters(preset):
    model, routers = make(preset)
    x = batch(seed=3)
    with torch.no_grad():
        with routers.capture(weights=True) as old:
            base = model(x).logits
        for mode in ("indices", "logits"):
            with routers.replay(old.trace, mode=mode):
                again = model(x).logits
            assert torch.equal(again, base), mode


def _experts_inputs(model):
    """Record the expert indices every MoE layer's experts module receives."""
    seen, handles = [], []
    for m in model.modules():
        if hasattr(m, "experts") and (hasattr(m, "gate") or hasattr(m, "router")):
            handles.append(m.experts.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone())))
    return seen, handles


@pytest.mark.parametrize("preset", FAMILIES)
def test_replay_indices_forces_stored_experts_after_a_change(preset):
    model, routers = make(preset)
    x = batch(seed=4)
    with torch.no_grad(), routers.capture(weights=True) as old:
        model(x)
    with torch.no_grad():
        for r in routers.routers:
            r.weight.add_(torch.randn_like(r.weight))  # the router now prefers other experts
    seen, handles = _experts_inputs(model)
    with torch.no_grad():
        model(x)
        free = [t.clone() for t in seen]
        seen.clear()
        with routers.replay(old.trace, mode="indices"):
            model(x)
    for h in handles:
        h.remove()
    stored = [
        old.trace.topk_idx[:, :, layer].reshape(-1, routers.model_top_k).long() for layer in range(routers.num_layers)
    ]
    assert any(not torch.equal(f.long(), s) for f, s in zip(free, stored, strict=True))  # routing did move
    for got, want in zip(seen, stored, strict=True):
        assert torch.equal(got.long(), want)


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v3"])
def test_replay_gradients_freeze_and_logits(preset):
    model, routers = make(preset)
    model.train()
    x = batch(seed=5)
    with torch.no_grad(), routers.capture(weights=True) as old:
        model(x)
    router_w = routers.routers[0].weight
    # replay_indices: the router still gets gradients (weights come from the current router)
    with routers.replay(old.trace, mode="indices"):
        model(x).logits.square().mean().backward()
    assert router_w.grad is not None and router_w.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    # replay_logits: no gradient reaches the router
    with routers.replay(old.trace, mode="logits"):
        model(x).logits.square().mean().backward()
    assert router_w.grad is None or torch.all(router_w.grad == 0)
    model.zero_grad(set_to_none=True)
    # freeze: gate weights are unchanged by an optimizer step, other weights change
    routers.freeze()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = [p.detach().clone() for p in routers.router_parameters()]
    emb = model.get_input_embeddings().weight.detach().clone()
    model(x).logits.square().mean().backward()
    opt.step()
    for p, q in zip(routers.router_parameters(), before, strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(model.get_input_embeddings().weight, emb)


def test_left_padding_and_positions():
    model, routers = make("tiny-qwen3-moe")
    a = torch.tensor([[5, 6, 7, 8, 9, 10]])
    b = torch.tensor([[11, 12, 13, 14]])
    x = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])  # left-pad row 2
    am = (x != 0).long()
    am[0] = 1
    resp = slice(3, 5)  # the last-but-one two positions: valid tokens in both rows
    with torch.no_grad():
        with routers.capture(positions=resp) as both:
            model(x, attention_mask=am)
        with routers.capture(positions=slice(3, 5)) as ra:
            model(a)
        with routers.capture(positions=slice(1, 3)) as rb:
            model(b)
    assert torch.equal(both.trace.topk_idx[0], ra.trace.topk_idx[0])
    assert torch.equal(both.trace.topk_idx[1], rb.trace.topk_idx[0])
    torch.testing.assert_close(both.trace.logp[1], rb.trace.logp[0], atol=1e-5, rtol=0)


def test_kv_cache_generation_capture_matches_full_forward():
    model, routers = make("tiny-qwen3-moe")
    x = batch(b=2, s=5, seed=6)
    with torch.no_grad():
        with routers.capture() as rec:  # positions=None: every call appended (prefill, then 1 token a step)
            seq = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        with routers.capture() as full:
            model(seq[:, :-1])  # the forward that scores the generated tokens
    assert rec.trace.topk_idx.shape == full.trace.topk_idx.shape == (2, 10, routers.num_layers, 2)
    assert torch.equal(rec.trace.topk_idx.sort(-1).values, full.trace.topk_idx.sort(-1).values)
    torch.testing.assert_close(rec.trace.logp, full.trace.logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_no_double_capture(reentrant):
    model, routers = make("tiny-qwen3-moe")
    x = batch(seed=7)
    with torch.no_grad(), routers.capture(positions=slice(4, 9)) as old:
        model(x)
    model.train()
    with routers.gather(old.trace, positions=slice(4, 9)) as plain:
        model(x).logits.sum().backward()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.zero_grad()
    with routers.gather(old.trace, positions=slice(4, 9)) as ckpt:
        out = model(x)
        out.logits.sum().backward()  # recomputes every layer inside the context
    assert ckpt.trace.logp.shape == plain.trace.logp.shape  # one record per layer, not two
    assert torch.equal(ckpt.trace.logp, plain.trace.logp)
    with routers.capture(positions=slice(4, 9)) as cap:
        model(x).logits.sum().backward()
    assert torch.equal(cap.trace.topk_idx, old.trace.topk_idx)


def test_keep_grad_ablation_reaches_the_router():
    model, routers = make("tiny-mixtral")
    x = batch(seed=8)
    with torch.no_grad(), routers.capture() as old:
        model(x)
    model.train()
    with torch.no_grad():
        routers.routers[0].weight.add_(0.1)
    with routers.gather(old.trace, keep_grad=True) as cur:
        model(x)
    cur.trace.logp.sum().backward()
    assert routers.routers[0].weight.grad.abs().sum() > 0


def test_configurable_k_and_topk_renorm():
    model, _ = make("tiny-olmoe")
    r3 = MoERouters(model, top_k=3, prob="topk_renorm")
    x = batch(seed=9)
    with torch.no_grad():
        ref = model(x, output_router_logits=True).router_logits
        with r3.capture() as rec:
            model(x)
    assert rec.trace.topk_idx.shape[-1] == 3
    for layer, lg in enumerate(ref):
        want = lg.float().topk(3, dim=-1).indices.sort(-1).values.view(3, 9, 3)
        assert torch.equal(rec.trace.topk_idx[:, :, layer].long().sort(-1).values, want)
    # renormalised over the stored set: the probabilities sum to 1
    torch.testing.assert_close(rec.trace.logp.exp().sum(-1), torch.ones(3, 9, r3.num_layers), atol=1e-6, rtol=0)
    assert r3.bytes_per_token() == r3.num_layers * 3 * 5
    with pytest.raises(ValueError, match="top_k must be in"):
        MoERouters(model, top_k=9)
    with pytest.raises(ValueError, match="replay needs the model's top-k"):
        with r3.replay(rec.trace):
            pass


def test_models_without_moe_layers_are_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match="LlamaForCausalLM .* has no MoE layer"):
        MoERouters(dense)
    all_dense = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            mlp_only_layers=[0, 1],
        )
    )
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM .* has no MoE layer .*every layer is dense"):
        MoERouters(all_dense)


def test_trace_errors_and_helpers():
    model, routers = make("tiny-qwen3-moe")
    x = batch(seed=10)
    with torch.no_grad(), routers.capture() as old:
        model(x)
    with pytest.raises(ValueError, match="select the trace rows/positions"), torch.no_grad():
        with routers.gather(old.trace[:2]):
            model(x)
    with pytest.raises(ValueError, match="replay needs a full-sequence trace"), torch.no_grad():
        with routers.replay(old.trace[:1]):
            model(x)
    with pytest.raises(ValueError, match="capture\\(weights=True\\)"), torch.no_grad():
        with routers.replay(old.trace, mode="logits"):
            model(x)
    assert index_dtype(8) == torch.uint8 and index_dtype(300) == torch.int16 and index_dtype(40000) == torch.int32
    assert old.trace.nbytes == 3 * 9 * routers.num_layers * 2 * 5
    assert routers.bytes_per_token() == routers.num_layers * 2 * 5
    assert old.trace[torch.tensor([0, 2])].topk_idx.shape[0] == 2


@pytest.mark.parametrize("reentrant", [False, True])
def test_replay_survives_gradient_checkpointing(reentrant):
    model, routers = make("tiny-mixtral")
    x = batch(seed=11)
    with torch.no_grad(), routers.capture(weights=True) as old:
        model(x)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    routers.start_replay(old.trace, mode="indices")
    model(x).logits.square().mean().backward()  # layers recompute under the same replay
    routers.stop_replay()
    assert routers.routers[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="replay mode='x'"):
        routers.start_replay(old.trace, mode="x")
    assert routers._replay_handles == []
