"""Rollout routing replay (R3, issue 24) in rspo's trainer: the sampler records routing in vLLM's layout, replay
forces exactly the given experts (loss and gradients equal an independent forward with forced experts), a
float32 rollout of the same weights gives identical routing so R3 changes nothing, engine records align in
every format, and bf16 rollouts show the mismatch R3 removes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rspo.config import ConfigError, build
from rspo.logprobs import response_log_probs
from rspo.policy import load_policy
from rspo.routing import MoERouters
from rspo.routing.step import RoutingOptions, RoutingStep, align_routed_experts, rollout_trace
from rspo.rundir import read_metrics
from rspo.sampler import HFSampler
from rspo.tasks import make_task
from rspo.train_config import TrainConfig
from rspo.trainer import Trainer
from tests.test_trainer import TIMING, tiny_cfg

COUNTDOWN = make_task("countdown")


def sample(policy, n: int = 6, tokens: int = 12, seed: int = 0):
    stream = COUNTDOWN.train_examples(seed=3)
    prompts = [COUNTDOWN.prompt(next(stream)) for _ in range(n)]
    return HFSampler(policy).sample(prompts, max_new_tokens=tokens, seed=seed, record_routing=True)


def own_topk(model, gen) -> torch.Tensor:
    """The model's own top-k per position and layer from one full forward ``(B, S, L, k)`` (independent of rspo)."""
    out = model(input_ids=gen.sequences, attention_mask=gen.attention_mask, output_router_logits=True)
    b, s = gen.sequences.shape
    k = model.config.num_experts_per_tok
    return torch.stack([lg.view(b, s, -1).topk(k, dim=-1).indices for lg in out.router_logits], dim=2)


def test_sampler_records_each_input_positions_experts(tiny_policy):
    pol = load_policy(tiny_policy)
    gen = sample(pol)
    b, s = gen.sequences.shape
    assert gen.routed_experts.shape == (b, s - 1, 2, pol.model.config.num_experts_per_tok)
    assert gen.routed_experts.dtype == torch.uint8  # one byte per token, layer and expert (E <= 256)
    with torch.no_grad():
        own = own_topk(pol.model, gen)[:, : s - 1]
    valid = gen.attention_mask[:, : s - 1].bool()  # left-padding positions route garbage in both
    same = (own.sort(-1).values == gen.routed_experts.long().sort(-1).values).all(-1)[valid]
    assert bool(same.all()), f"{int((~same).sum())} token-layers differ"  # prefill and every decode step


def test_replay_forces_exactly_the_given_experts_and_keeps_the_router_gradient(tiny_policy):
    pol = load_policy(tiny_policy)
    model, gen = pol.model, sample(pol)
    routers = MoERouters(model)
    b, s = gen.sequences.shape
    k, e = routers.model_top_k, routers.num_experts
    g = torch.Generator().manual_seed(0)
    given = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b * s * 2)]).view(b, s, 2, k)
    seen = {}

    def probe(layer):
        def hook(module, inputs, output):
            seen[layer] = output[2].view(b, s, -1).clone()

        return hook

    routers.start_replay(rollout_trace(given[:, :-1].to(torch.uint8)), mode="indices")
    handles = [r.register_forward_hook(probe(i)) for i, r in enumerate(routers.routers)]  # after the replay's
    try:
        out = model(input_ids=gen.sequences, attention_mask=gen.attention_mask)
    finally:
        routers.stop_replay()
        for h in handles:
            h.remove()
    for layer in range(2):
        assert torch.equal(seen[layer][:, :-1].sort(-1).values, given[:, :-1, layer].sort(-1).values)
    out.logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers.router_parameters())


def test_r3_loss_and_gradients_equal_an_independent_forced_forward(tiny_policy):
    """The R3 training forward (replay + gather) against the routers' forward replaced by a plain function that
    returns the given experts with Qwen3-MoE's weights computed here, not by rspo: equal bit for bit (float32:
    transformers' grouped expert kernel has no float64)."""
    pol = load_policy(tiny_policy)
    model = pol.model
    gen = sample(pol)
    b, s = gen.sequences.shape
    t = gen.response_mask.shape[1]
    resp = slice(s - t - 1, s - 1)
    g = torch.Generator().manual_seed(1)
    given = (
        torch.stack(
            [
                torch.randperm(model.config.num_experts, generator=g)[: model.config.num_experts_per_tok]
                for _ in range(b * (s - 1) * 2)
            ]
        )
        .view(b, s - 1, 2, -1)
        .to(torch.uint8)
    )
    w = torch.randn(b, t, generator=g)
    step = RoutingStep(model, RoutingOptions(shift=True, control="replay_rollout"))
    with torch.no_grad(), step.capture(resp, rollout=given) as rec:
        response_log_probs(model, gen.sequences, gen.attention_mask, t, entropy=False)
    old = step.old_trace(rec.trace, resp, rollout=given)
    model.zero_grad()
    with step.forward(old, resp):
        logp, _, _ = response_log_probs(model, gen.sequences, gen.attention_mask, t, entropy=False)
    (logp * w).sum().backward()
    step.end()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(old.trace.topk_idx, rollout_trace(given).topk_idx[:, resp])  # old = the rollout's experts

    full = rollout_trace(given).topk_idx.long()  # (B, S, L, k)
    gates = [m for _, m in model.named_modules() if type(m).__name__ == "Qwen3MoeTopKRouter"]
    originals = [gate.forward for gate in gates]

    def forced(layer, gate):
        def forward(hidden):
            logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), gate.weight)
            idx = full[:, :, layer].reshape(logits.shape[0], -1)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(-1, idx)
            if gate.norm_topk_prob:
                probs = probs / probs.sum(-1, keepdim=True)
            return logits, probs.to(logits.dtype), idx

        return forward

    for layer, gate in enumerate(gates):
        gate.forward = forced(layer, gate)
    try:
        model.zero_grad()
        logp2, _, _ = response_log_probs(model, gen.sequences, gen.attention_mask, t, entropy=False)
        (logp2 * w).sum().backward()
    finally:
        for gate, f in zip(gates, originals, strict=True):
            gate.forward = f
    assert torch.equal(logp, logp2)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(ours[n], p.grad), n


def run_metrics(tiny_policy, tmp_path, name: str, **over) -> list[dict]:
    cfg = tiny_cfg(tiny_policy, tmp_path / name, objective__name="rspo", **over)
    Trainer(cfg, progress=False).train()
    return read_metrics(tmp_path / name)


def test_float32_rollout_gives_identical_routing_and_r3_changes_nothing(tiny_policy, tmp_path):
    """The rollout's routing is the trainer's own when both are the same float32 weights: replaying it changes
    nothing, bit for bit (one update per rollout batch: after an update the trainer's routing moves, and
    replaying the rollout's is what R3 is for)."""
    one = {"mini_batch_size": 16}
    plain = run_metrics(tiny_policy, tmp_path, "plain", rollout__record_routing=True, **one)
    r3 = run_metrics(tiny_policy, tmp_path, "r3", routing__control="replay_rollout", rollout__dtype="float32", **one)
    keys = ("loss/", "ratio/", "clip_ratio/", "router/gamma", "reward/", "grad/", "rollout/logp_diff", "entropy/")
    for i, (a, b) in enumerate(zip(plain, r3, strict=True)):
        assert a["rollout/routing_disagree_tokens"] == b["rollout/routing_disagree_tokens"] == 0.0
        for k in (k for k in a if k.startswith(keys)):
            if i == 0 and k != "grad/norm":
                assert a[k] == b[k], (
                    k
                )  # the first step, forward: bit for bit, the replayed experts are the router's own
            else:  # the backward takes another path to the router (a gather, not top-k): float32 rounding only
                assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7), (i, k, a[k], b[k])


def test_bfloat16_rollouts_show_the_mismatch_and_r3_replays_the_rollout(tiny_policy, tmp_path):
    rows = run_metrics(tiny_policy, tmp_path, "bf16", routing__control="replay_rollout", rollout__dtype="bfloat16")
    for r in rows:
        assert 0 <= r["rollout/routing_disagree_tokens"] <= 1 and "rollout/routing_agree_layer1" in r
        for k in ("logp_diff_mean", "kl_k3", "ratio_max"):  # the run's own mismatch is the replayed one
            assert r[f"rollout/{k}"] == r[f"rollout/replayed/{k}"] and math.isfinite(r[f"rollout/own/{k}"])
    assert any(r["rollout/own/logp_diff_mean"] > 0 for r in rows)  # bf16 against float32 differs
    assert not any(k.startswith(TIMING) and not math.isfinite(v) for r in rows for k, v in r.items())


def test_engine_records_align_in_every_format():
    # two sequences: prompts of 3 and 2 tokens left-padded to P = 3, responses of 2 and 3 tokens (T = 3)
    p_lens, g_lens, p_pad, s = [3, 2], [2, 3], 3, 6
    layers, k = 2, 2
    recs = [
        np.arange((p + g - 1) * layers * k).reshape(p + g - 1, layers, k) % 7
        for p, g in zip(p_lens, g_lens, strict=True)
    ]
    for dtype in (np.uint8, np.uint16, np.int32):
        tr = align_routed_experts([r.astype(dtype) for r in recs], p_lens, g_lens, p_pad, s, num_experts=8)
        assert tr.topk_idx.dtype == torch.uint8 and tr.topk_idx.shape == (2, s, layers, k)
        assert torch.equal(tr.topk_idx[0, 0:4].long(), torch.as_tensor(recs[0]).long())  # no padding in row 0
        assert torch.equal(tr.topk_idx[1, 1:5].long(), torch.as_tensor(recs[1]).long())  # one left pad in row 1
        assert tr.known.tolist() == [[True] * 4 + [False] * 2, [False] + [True] * 4 + [False]]
    # vLLM's routed_experts_prompt_start: the first prompt rows are not returned; those positions keep their own
    tr = align_routed_experts([r[1:] for r in recs], p_lens, g_lens, p_pad, s, prompt_start=1)
    assert tr.known.tolist() == [[False] + [True] * 3 + [False] * 2, [False, False] + [True] * 3 + [False]]
    with pytest.raises(ValueError, match=r"sequence 1: shape \(3, 2, 2\), expected \(4, L, k\)"):
        align_routed_experts([recs[0], recs[1][:3]], p_lens, g_lens, p_pad, s)
    with pytest.raises(ValueError, match="2 layers x top-2; the model 3 x top-2"):
        align_routed_experts(recs, p_lens, g_lens, p_pad, s, num_layers=3, top_k=2)
    with pytest.raises(ValueError, match=r"sequence 0 hold indices outside 0..3"):
        align_routed_experts(recs, p_lens, g_lens, p_pad, s, num_experts=4)


def test_r3_options_are_checked(tiny_policy, tmp_path):
    with pytest.raises(ConfigError, match="rollout.record_routing cannot be false"):
        build(TrainConfig, {"routing": {"control": "replay_rollout"}, "rollout": {"record_routing": False}})
    cfg = build(TrainConfig, {"rollout": {"dtype": "bfloat16"}})
    assert cfg.rollout.record_routing  # a rollout precision of its own: the routing is recorded for diagnostics
    with pytest.raises(ConfigError, match="replay_rollout replays the rollout.s 2 experts per layer"):
        Trainer(
            tiny_cfg(tiny_policy, tmp_path / "k", routing__control="replay_rollout", router_shift__top_k=1),
            progress=False,
        )


def test_trl_rejects_rollout_replay_and_says_why():
    from rspo.integrations.trl import RSPOConfig

    with pytest.raises(ValueError, match="TRL 1.16 returns none.*enable_return_routed_experts"):
        RSPOConfig(output_dir="x", use_cpu=True, bf16=False, report_to=[], routing_control="replay_rollout")
