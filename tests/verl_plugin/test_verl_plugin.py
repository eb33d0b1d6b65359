"""The verl plugin on CPU, in the style of verl's own ``*_on_cpu.py`` tests: verl's FSDP engine class is
built without ``__init__`` around a tiny real Qwen3-MoE (as verl's engine tests do), and its own
``forward_step`` / ``forward_backward_batch`` (micro-batching, dynamic-batch reordering) drive our hooks and
loss. Runs in verl's environment (``make test-verl``: verl 0.9.x with its transformers < 5.11)."""

from __future__ import annotations

import functools
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("verl.workers.engine.fsdp.transformer_impl", reason="make test-verl installs verl with its deps")

import verl.utils.tensordict_utils as tu
from tensordict import TensorDict
from verl.trainer.ppo.core_algos import kl_penalty
from verl.utils.torch_functional import entropy_from_logits
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.engine.fsdp import transformer_impl as ti
from verl.workers.utils import losses as verl_losses
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

from rspo.integrations import verl as rv
from rspo.objectives import compute_policy_loss
from rspo.routing import router_shift_ratio

F64 = torch.float64


@pytest.fixture(autouse=True)
def cpu_device(monkeypatch):
    monkeypatch.setattr(ti, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(ti, "get_device_name", lambda: "cpu")


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return Qwen3MoeForCausalLM(cfg).float().eval()


def make_engine(model):
    eng = object.__new__(ti.FSDPEngineWithLMHead)
    eng.module = model
    eng.use_ulysses_sp = False
    eng.pad_to_length = False
    eng.ulysses_device_mesh = None
    eng.ulysses_sequence_parallel_size = 1
    eng.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    eng.compute_entropy_from_logits = entropy_from_logits
    eng._autocast_dtype = torch.float32
    return eng


PROMPT_LENS = [3, 5, 2, 4]
RESP_LENS = [4, 2, 5, 3]


def routed_experts(seed: int = 5, layers: int = 2, k: int = 2, experts: int = 8) -> torch.Tensor:
    """A rollout's routing as verl's agent loop stores it: ``(B, P + R, L, k)`` int16 over the padded sequence,
    distinct experts per recorded position, zeros where the engine recorded nothing (padding, the last
    response token)."""
    g = torch.Generator().manual_seed(seed)
    b, p, r = len(PROMPT_LENS), max(PROMPT_LENS), max(RESP_LENS)
    out = torch.zeros(b, p + r, layers, k, dtype=torch.int16)
    for i, (pl, rl) in enumerate(zip(PROMPT_LENS, RESP_LENS, strict=True)):
        for pos in range(p - pl, p + rl - 1):
            for layer in range(layers):
                out[i, pos, layer] = torch.randperm(experts, generator=g)[:k].to(torch.int16)
    return out


def make_batch(seed: int = 0, use_remove_padding: bool = True, routed: torch.Tensor | None = None) -> TensorDict:
    """verl's own layout: left-padded prompts + right-padded responses, converted by verl's
    ``left_right_2_no_padding`` (nested input_ids / position_ids; and ``routed_experts`` when given)."""
    g = torch.Generator().manual_seed(seed)
    b, p, r = len(PROMPT_LENS), max(PROMPT_LENS), max(RESP_LENS)
    prompts = torch.zeros(b, p, dtype=torch.long)
    responses = torch.zeros(b, r, dtype=torch.long)
    am = torch.zeros(b, p + r, dtype=torch.long)
    for i, (pl, rl) in enumerate(zip(PROMPT_LENS, RESP_LENS, strict=True)):
        prompts[i, p - pl :] = torch.randint(1, 40, (pl,), generator=g)
        responses[i, :rl] = torch.randint(1, 40, (rl,), generator=g)
        am[i, p - pl : p + rl] = 1
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    resp_mask = am[:, p:].clone()
    fields = {
        "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": am,
        "position_ids": pos,
        "response_mask": resp_mask,
        "prompts": prompts,
        "responses": responses,
    }
    if routed is not None:
        fields["routed_experts"] = routed
    td = TensorDict(fields, batch_size=[b])
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(
        td,
        temperature=1.0,
        use_remove_padding=use_remove_padding,
        dp_size=1,
        batch_num_tokens=None,
        global_batch_size=None,
    )
    return td


def actor_config(**kw) -> ActorConfig:
    """verl's ActorConfig; ``clip_ratio`` also sets clip_ratio_low/high (verl's losses read those first, and
    they default to 0.2, not to clip_ratio)."""
    base = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2, clip_ratio_c=3.0)
    if "clip_ratio" in kw:
        base |= {"clip_ratio_low": kw["clip_ratio"], "clip_ratio_high": kw["clip_ratio"]}
    return ActorConfig(**{**base, **kw})


def old_pass(eng, td):
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False)
    with torch.no_grad():
        _, out = eng.forward_step(td, loss_function=None, forward_only=True)
    return out["model_output"]


def with_old(td, mo, seed=1):
    """The update's batch: the old pass's outputs as verl's trainer stores them, and advantages."""
    td = td.clone()
    old_lp = no_padding_2_padding(mo["log_probs"], td)
    td["old_log_probs"] = old_lp
    g = torch.Generator().manual_seed(seed)
    td["advantages"] = torch.randn(old_lp.shape[0], 1, generator=g).expand_as(old_lp).clone()
    td[rv.OLD_IDX] = mo[rv.OLD_IDX]
    td[rv.OLD_LOGP] = mo[rv.OLD_LOGP]
    tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=True)
    return td


def update(eng, td, rspo_cfg, actor=None):
    loss_fn = functools.partial(rv.rspo_ppo_loss, config=actor or actor_config(), rspo=rspo_cfg)
    eng.module.zero_grad()
    loss, out = eng.forward_step(td, loss_function=loss_fn, forward_only=False)
    loss.backward()
    return loss, out


# ------------------------------------------------------------------------------------------- plugin wiring
def test_entry_point_loads_with_verl_and_patches_the_actor_worker():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="verl.plugins")}
    assert eps.get("rspo") == "rspo.integrations.verl_plugin"
    code = (
        "import sys, verl; print('rspo.integrations.verl_plugin' in sys.modules); "
        "import verl.workers.engine_workers as w; print(getattr(w.ActorRolloutRefWorker.init_model, "
        "'_rspo_patched', False)); print(hasattr(w.ActorRolloutRefWorker.init_model, '__wrapped__')); "
        "import verl.trainer.ppo.ray_trainer as t; from omegaconf import OmegaConf\n"
        "try:\n  t.RayPPOTrainer(OmegaConf.create({'actor_rollout_ref': {'rspo': {'objective': 'rspo'}}}), None)\n"
        "except Exception as e:\n  print(type(e).__name__ + ': ' + str(e))"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[:3] == ["True", "True", "True"]
    assert lines[3] == f"ConfigError: {rv.LEGACY_TRAINER_ERROR}"  # the legacy trainer refuses the plugin's config
    assert "trainer.use_v1=true" in lines[3]


def test_verl_internals_we_rely_on(monkeypatch):
    rv.check_verl_internals()
    key = "verl.workers.utils.padding.no_padding_2_padding"
    monkeypatch.setitem(rv.VERL_INTERNALS, key, ("tensor", "batch"))
    with pytest.raises(RuntimeError, match="no_padding_2_padding.*supports verl>=0.9.1"):
        rv.check_verl_internals()


def test_after_init_model_installs_capture_and_loss(model):
    from omegaconf import OmegaConf

    calls = []
    eng = make_engine(model)
    actor = actor_config()
    worker = SimpleNamespace(
        config=OmegaConf.create({"rspo": {"objective": "rspo", "gamma_min": 0.3}}),
        loss_fn=functools.partial(verl_losses.ppo_loss, config=actor),
        actor=SimpleNamespace(engine=eng, set_loss_fn=calls.append),
    )
    cfg = rv.after_init_model(worker)
    assert cfg.gamma_min == 0.3 and cfg.router_shift
    assert eng._rspo_capture.cfg is cfg
    assert calls[0].func is rv.rspo_ppo_loss
    assert calls[0].keywords == {"config": actor, "rspo": cfg, "capture": eng._rspo_capture}
    plain = SimpleNamespace(config=OmegaConf.create({}), loss_fn="verl's", actor=SimpleNamespace(engine=None))
    assert rv.after_init_model(plain) is None and plain.loss_fn == "verl's"


def test_config_errors_name_the_key():
    with pytest.raises(
        ValueError,
        match=r"actor_rollout_ref\.rspo\.gama_min: unknown key \(did you mean "
        r"actor_rollout_ref\.rspo\.gamma_min\?\)",
    ):
        rv.VerlRSPOConfig.from_verl({"gama_min": 0.2})
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rspo\.gamma_min must be a number, got 'x'"):
        rv.VerlRSPOConfig.from_verl({"gamma_min": "x"})
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rspo\.gamma_min: must be in \(0, 1\]"):
        rv.VerlRSPOConfig.from_verl({"gamma_min": 2.0})
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rspo\.objective='ppo'; valid"):
        rv.VerlRSPOConfig.from_verl({"objective": "ppo"})
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rspo\.router_shift=false: objective 'rspo' needs"):
        rv.VerlRSPOConfig.from_verl({"objective": "rspo", "router_shift": False})
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rspo\.router_shift=true: objective 'gmpo' cannot"):
        rv.VerlRSPOConfig.from_verl({"objective": "gmpo", "router_shift": True})
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rspo\.form applies to the rspo objective only"):
        rv.VerlRSPOConfig.from_verl({"objective": "grpo", "router_shift": True, "form": "eq5_literal"})
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rspo\.routing_control='freeze': router freezing"):
        rv.VerlRSPOConfig.from_verl({"routing_control": "freeze"})
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rspo\.clip_drop: needs clip_threshold"):
        rv.VerlRSPOConfig.from_verl({"clip_drop": True})
    # every router-shift option of rspo.options is a key here (the ones the first plugin lacked too)
    cfg = rv.VerlRSPOConfig.from_verl(
        {"form": "eq5_literal", "clip_threshold": 0.9, "clip_drop": True, "prob": "topk_renorm"}
    )
    assert (cfg.form, cfg.clip_threshold, cfg.clip_drop, cfg.prob) == ("eq5_literal", 0.9, True, "topk_renorm")
    hp = rv.objective_hparams(actor_config(clip_ratio=0.4), cfg)
    assert (hp["router_shift_form"], hp["router_clip_threshold"], hp["router_clip_drop"]) == ("eq5_literal", 0.9, True)
    cfg = rv.VerlRSPOConfig()
    with pytest.raises(ValueError, match=r"policy_loss\.loss_mode='geo_mean'"):
        rv.objective_hparams(actor_config(policy_loss=PolicyLossConfig(loss_mode="geo_mean")), cfg)
    with pytest.raises(ValueError, match=r"clip_ratio_c=10.0: objective 'rspo' has no dual clip"):
        rv.objective_hparams(actor_config(clip_ratio_c=10.0), cfg)
    with pytest.raises(ValueError, match=r"loss_agg_mode='token-sum'"):
        rv.objective_hparams(actor_config(loss_agg_mode="token-sum"), rv.VerlRSPOConfig(objective="grpo"))
    hp = rv.objective_hparams(
        actor_config(clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=4.0, loss_agg_mode="seq-mean-token-mean"),
        rv.VerlRSPOConfig(objective="grpo"),
    )
    assert hp == {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 4.0, "loss_agg": "seq-mean-token-mean"}


# ------------------------------------------------------------------------------------------- capture
def reference_router(model, td):
    """Independently, per sample: ``output_router_logits`` on the unpadded sequence -> (S, L, K) top-K
    experts (sorted) and their full-softmax log-probs."""
    idx, logp = [], []
    for seq in td["input_ids"].unbind():
        with torch.no_grad():
            out = model(seq[None], output_router_logits=True)
        lg = torch.stack(out.router_logits, dim=1).float()  # (S, L, E)
        top = lg.topk(2, dim=-1).indices.sort(-1).values
        idx.append(top)
        logp.append(torch.log_softmax(lg, -1).gather(-1, top))
    return idx, logp


@pytest.mark.parametrize("packed", [True, False])
def test_old_pass_capture_equals_output_router_logits(model, packed):
    eng = make_engine(model)
    rv.install_capture(eng, rv.VerlRSPOConfig())
    td = make_batch(use_remove_padding=packed)
    mo = old_pass(eng, td)
    ref_idx, ref_lp = reference_router(model, td)
    for i, (got_i, got_lp) in enumerate(zip(mo[rv.OLD_IDX].unbind(), mo[rv.OLD_LOGP].unbind(), strict=True)):
        order = got_i.long().sort(-1)
        assert torch.equal(order.values, ref_idx[i]), i
        torch.testing.assert_close(got_lp.gather(-1, order.indices), ref_lp[i], atol=1e-5, rtol=0)
    # response positions, as verl slices log_probs: (B, T_resp, L, K)
    assert no_padding_2_padding(mo[rv.OLD_LOGP], td).shape == (4, max(RESP_LENS), 2, 2)


def test_reference_pass_is_not_captured(model):
    eng = make_engine(model)
    rv.install_capture(eng, rv.VerlRSPOConfig())
    td = make_batch()
    tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=False)
    with torch.no_grad():
        _, out = eng.forward_step(td, loss_function=None, forward_only=True)
    assert rv.OLD_IDX not in out["model_output"]


def test_update_gamma_is_one_with_unchanged_weights_and_below_after_the_router_moves(model):
    import copy

    m = copy.deepcopy(model)
    eng = make_engine(m)
    cfg = rv.VerlRSPOConfig(gamma_min=0.05)
    rv.install_capture(eng, cfg)
    td = make_batch()
    up = with_old(td, old_pass(eng, td))
    loss, out = update(eng, up, cfg, actor_config(clip_ratio=0.4))
    met = out["metrics"]
    assert met["router/gamma_mean"] == 1.0 and met["router/gamma_min"] == 1.0
    assert met["router/non_shifted_ratio"] == 1.0
    grads = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    # gamma = 1, detached: the same loss and gradients as GMPO without the router shift
    loss_g, _ = update(eng, up, rv.VerlRSPOConfig(objective="gmpo"), actor_config(clip_ratio=0.4))
    torch.testing.assert_close(loss_g, loss, atol=1e-7, rtol=0)
    for g, p in zip(grads, [p for p in m.parameters() if p.grad is not None], strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-7, rtol=0)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.gate.weight.add_(0.5 * torch.randn_like(layer.mlp.gate.weight))
    _, out = update(eng, up, cfg)
    assert out["metrics"]["router/gamma_mean"] < 0.999
    assert out["metrics"]["router/non_shifted_ratio"] < 1.0


def test_packed_and_padded_layouts_agree(model):
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.gate.weight.add_(0.3 * torch.randn_like(layer.mlp.gate.weight))
    results = {}
    for packed in (True, False):
        eng = make_engine(model)
        rv.install_capture(eng, rv.VerlRSPOConfig())
        td = make_batch(use_remove_padding=packed)
        up = with_old(td, old_pass(eng, td))
        eng2 = make_engine(m)
        rv.install_capture(eng2, rv.VerlRSPOConfig())
        loss, out = update(eng2, up, rv.VerlRSPOConfig())
        results[packed] = (loss.detach(), out["metrics"]["router/gamma_mean"], up[rv.OLD_IDX].values())
    assert torch.equal(results[True][2], results[False][2])
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=0)
    assert abs(results[True][1] - results[False][1]) < 1e-5 and results[True][1] < 1.0


def test_update_without_the_old_record_says_why(model):
    eng = make_engine(model)
    rv.install_capture(eng, rv.VerlRSPOConfig())
    td = make_batch()
    up = with_old(td, old_pass(eng, td))
    del up[rv.OLD_IDX]
    with pytest.raises(KeyError, match="bypass mode"):
        update(eng, up, rv.VerlRSPOConfig())


def test_gradient_checkpointing_records_once(model):
    import copy

    m = copy.deepcopy(model).train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    eng = make_engine(m)
    rv.install_capture(eng, rv.VerlRSPOConfig())
    td = make_batch()
    up = with_old(td, old_pass(eng, td))
    _loss, out = update(eng, up, rv.VerlRSPOConfig())  # a second record per layer would raise
    assert out["metrics"]["router/gamma_mean"] == 1.0


# ------------------------------------------------------------------------------------------- pass-through
@pytest.fixture(scope="module")
def gloo():
    import torch.distributed as dist

    if not dist.is_initialized():  # a free port: a fixed one can be taken (TIME_WAIT, another run)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_old_record_passes_through_verl_micro_batching_to_the_update(model, gloo, monkeypatch):
    """verl's own forward_backward_batch (dynamic batch size: micro-batches in another order) for the old
    pass and the update; the record each row gets back is the one of its own sequence."""
    import verl.utils.seqlen_balancing as sb

    monkeypatch.setattr(sb, "get_device_name", lambda: "cpu")
    eng = make_engine(model)
    rv.install_capture(eng, rv.VerlRSPOConfig())
    td = make_batch()
    tu.assign_non_tensor(td, use_dynamic_bsz=True, max_token_len_per_gpu=14, calculate_entropy=True, compute_loss=False)
    td["loss_mask"] = td["response_mask"]
    out = eng.forward_backward_batch(td, loss_function=None, forward_only=True)
    mo = out["model_output"]
    ref_idx, _ = reference_router(model, td)
    for i, got in enumerate(mo[rv.OLD_IDX].unbind()):
        assert torch.equal(got.long().sort(-1).values, ref_idx[i]), i
    up = with_old(td, mo)
    tu.assign_non_tensor(up, global_batch_size=4)
    loss_fn = functools.partial(rv.rspo_ppo_loss, config=actor_config(), rspo=rv.VerlRSPOConfig())
    res = eng.forward_backward_batch(up, loss_function=loss_fn, forward_only=False)
    gm = res["metrics"]["router/gamma_mean"]
    assert len(gm) >= 2 and all(g == 1.0 for g in gm)  # several micro-batches, each with exactly unchanged routing


# ------------------------------------------------------------------------------------------- the loss
def loss_inputs(seed: int, objective: str = "rspo", same_router: bool = False):
    """Synthetic nested model output and batch (float64), with old/current router log-probs."""
    g = torch.Generator().manual_seed(seed)
    td = make_batch(seed)
    n = td["input_ids"].values().shape[0]
    offsets = td["input_ids"].offsets()
    lp = -torch.rand(n, generator=g, dtype=F64) * 2
    old = (lp + 0.2 * torch.randn(n, generator=g, dtype=F64)).clamp(max=0)
    old_r = torch.log_softmax(torch.randn(n, 2, 8, generator=g, dtype=F64), -1)[..., :2]
    cur_r = old_r if same_router else old_r + 0.3 * torch.randn(n, 2, 2, generator=g, dtype=F64)
    nest = functools.partial(torch.nested.nested_tensor_from_jagged, offsets=offsets)
    leaf = lp.clone().requires_grad_(True)
    lp_nested = nest(leaf)
    td["old_log_probs"] = no_padding_2_padding(nest(old), td)
    b = td["old_log_probs"].shape[0]
    td["advantages"] = torch.randn(b, 1, generator=g, dtype=F64).expand(b, td["old_log_probs"].shape[1]).clone()
    idx = torch.zeros(n, 2, 2, dtype=torch.uint8)
    td[rv.OLD_IDX], td[rv.OLD_LOGP] = nest(idx), nest(old_r)
    mo = {"log_probs": lp_nested, rv.CUR_LOGP: nest(cur_r), rv.CUR_IDX: nest(idx)}
    mo["leaf"] = leaf
    return td, mo


@pytest.mark.parametrize("objective", ["rspo", "grpo", "gmpo", "gspo"])
def test_loss_equals_compute_policy_loss(objective):
    cfg = rv.VerlRSPOConfig(objective=objective, router_shift=None if objective != "grpo" else True)
    td, mo = loss_inputs(0)
    actor = actor_config(
        clip_ratio=0.3 if objective in ("grpo",) else 0.4, clip_ratio_c=10.0 if objective == "grpo" else 3.0
    )
    if objective == "gspo":
        actor = actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    loss, _met = rv.rspo_ppo_loss(actor, mo, td, rspo=cfg)
    lp = no_padding_2_padding(mo["log_probs"], td)
    mask = td["response_mask"].to(F64)
    gamma = None
    if cfg.router_shift:
        gamma = router_shift_ratio(
            no_padding_2_padding(td[rv.OLD_LOGP], td), no_padding_2_padding(mo[rv.CUR_LOGP], td), gamma_min=0.5
        )
        assert float(gamma[mask > 0].min()) < 0.99  # the weight acts in this case
    hp = rv.objective_hparams(actor, cfg)
    ref, _ = compute_policy_loss(objective, lp, td["old_log_probs"], td["advantages"], mask, router_shift=gamma, **hp)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=0)


def test_rspo_with_gamma_one_equals_verls_geo_mean():
    td, mo = loss_inputs(1, same_router=True)
    actor = actor_config(clip_ratio=0.4)
    ours, met = rv.rspo_ppo_loss(actor, mo, td, rspo=rv.VerlRSPOConfig())
    assert met["router/gamma_mean"] == 1.0
    g_ours = torch.autograd.grad(ours, mo["leaf"])[0]
    td2, mo2 = loss_inputs(1, same_router=True)
    verl_cfg = actor_config(clip_ratio=0.4, policy_loss=PolicyLossConfig(loss_mode="geo_mean"))
    theirs, _ = verl_losses.ppo_loss(verl_cfg, {"log_probs": mo2["log_probs"]}, td2)
    g_theirs = torch.autograd.grad(theirs, mo2["leaf"])[0]
    # verl divides by (len + 1e-8) where we divide by len
    torch.testing.assert_close(ours, theirs.to(F64), atol=1e-8, rtol=0)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-8, rtol=0)


@pytest.mark.parametrize(
    ("objective", "agg"), [("rspo", "token-mean"), ("grpo", "token-mean"), ("grpo", "seq-mean-token-mean")]
)
def test_micro_batches_sum_to_the_global_mini_batch_loss(objective, agg):
    """verl's normalisation: micro-batch losses over global counts (x dp_size) sum to the full batch's loss."""
    cfg = rv.VerlRSPOConfig(objective=objective, router_shift=True)
    actor = actor_config(loss_agg_mode=agg, clip_ratio=0.3)
    td, mo = loss_inputs(2)
    full, _ = rv.rspo_ppo_loss(actor, mo, td, rspo=cfg)
    g_full = torch.autograd.grad(full, mo["leaf"])[0]
    n_tok, parts, grads = int(td["response_mask"].sum()), [], []
    for rows in ([0, 1], [2, 3]):
        td2, mo2 = loss_inputs(2)
        sub = tu.index_select_tensor_dict(td2, rows)  # as verl splits micro-batches
        tu.assign_non_tensor(sub, batch_num_tokens=n_tok, global_batch_size=4, dp_size=1)
        mos = {
            k: torch.nested.as_nested_tensor([v.unbind()[r] for r in rows], layout=torch.jagged)
            for k, v in mo2.items()
            if k != "leaf"
        }
        loss, met = rv.rspo_ppo_loss(actor, mos, sub, rspo=cfg)
        parts.append(loss)
        grads.append(torch.autograd.grad(loss, mo2["leaf"])[0])
        assert met["pg_loss"].aggregation.name == "SUM"
    torch.testing.assert_close(parts[0] + parts[1], full, atol=1e-12, rtol=0)
    torch.testing.assert_close(grads[0] + grads[1], g_full, atol=1e-12, rtol=0)


def test_rollout_weights_entropy_and_kl_follow_verl():
    td, mo = loss_inputs(3)
    g = torch.Generator().manual_seed(9)
    td["rollout_is_weights"] = torch.rand(td["old_log_probs"].shape, generator=g, dtype=F64) + 0.5
    td["ref_log_prob"] = td["old_log_probs"] - 0.1
    mo["entropy"] = torch.nested.nested_tensor_from_jagged(
        torch.rand(td["input_ids"].values().shape[0], dtype=F64), offsets=td["input_ids"].offsets()
    )
    actor = actor_config(
        clip_ratio=0.4, entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type="low_var_kl"
    )
    loss, met = rv.rspo_ppo_loss(actor, mo, td, rspo=rv.VerlRSPOConfig())
    lp = no_padding_2_padding(mo["log_probs"], td)
    mask = td["response_mask"].to(F64)
    gamma = router_shift_ratio(
        no_padding_2_padding(td[rv.OLD_LOGP], td), no_padding_2_padding(mo[rv.CUR_LOGP], td), gamma_min=0.5
    )
    pg, _ = compute_policy_loss(
        "rspo",
        lp,
        td["old_log_probs"],
        td["advantages"],
        mask,
        router_shift=gamma,
        rollout_weights=td["rollout_is_weights"],
        rollout_weights_reduce="geometric",
        clip_low=0.4,
        clip_high=0.4,
    )
    ent = no_padding_2_padding(mo["entropy"], td)
    kl = kl_penalty(lp, td["ref_log_prob"], "low_var_kl")
    ref = pg - 0.01 * (ent * mask).sum() / mask.sum() + 0.05 * (kl * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=0)
    assert "pg/rollout/weight_mean" in met


def test_an_abandoned_forward_leaves_no_hooks(model):
    eng = make_engine(model)
    cap = rv.install_capture(eng, rv.VerlRSPOConfig())
    td = make_batch()
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False)
    routers = cap.step.routers.routers

    def hooks():  # transformers may keep hooks of its own on these modules: count ours by difference
        return [len(r._forward_hooks) for r in routers] + [len(model._forward_pre_hooks)]

    before = hooks()
    with torch.no_grad():
        eng.prepare_model_inputs(td)  # armed for the old pass; the forward then fails before the outputs
    assert hooks() == [n + 1 for n in before]
    cap.after_abandoned()
    assert hooks() == before
    mo = old_pass(eng, td)  # and the next micro-batch records normally
    assert mo[rv.OLD_IDX].values().shape[1:] == (2, 2)


# ------------------------------------------------------------------------------------------- R3
def forced_forward_log_probs(model, td, routed):
    """Independently of rspo: each sequence alone, its routers replaced by a function returning the rollout's
    experts (the recorded rows; the router's own elsewhere) with Qwen3-MoE's weights computed here."""
    gates = [m for _, m in model.named_modules() if type(m).__name__ == "Qwen3MoeTopKRouter"]
    p = max(PROMPT_LENS)
    out = []
    for i, (seq, pl) in enumerate(zip(td["input_ids"].unbind(), PROMPT_LENS, strict=True)):
        rows = routed[i, p - pl : p - pl + seq.shape[0]].long()  # (S_i, L, k) this sequence's positions

        def forced(layer, gate, rows=rows):
            def forward(hidden):
                logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), gate.weight)
                own = logits.topk(rows.shape[-1], dim=-1).indices
                recorded = (rows[:, layer] != 0).any(-1, keepdim=True)
                idx = torch.where(recorded, rows[:, layer], own)
                w = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(-1, idx)
                if gate.norm_topk_prob:
                    w = w / w.sum(-1, keepdim=True)
                return logits, w.to(logits.dtype), idx

            return forward

        originals = [g.forward for g in gates]
        for layer, g in enumerate(gates):
            g.forward = forced(layer, g)
        try:
            with torch.no_grad():
                logits = model(seq[None]).logits[0].float()
        finally:
            for g, f in zip(gates, originals, strict=True):
                g.forward = f
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, seq[1:, None]).squeeze(-1)  # (S_i - 1,)
        out.append(lp[pl - 1 :])  # the response tokens
    return out


@pytest.mark.parametrize("packed", [True, False])
def test_r3_replays_the_rollouts_experts_in_the_old_pass_and_the_update(model, packed):
    routed = routed_experts()
    td = make_batch(0, use_remove_padding=packed, routed=routed)
    eng = make_engine(model)
    cfg = rv.VerlRSPOConfig(routing_control="replay_rollout")
    rv.install_capture(eng, cfg)
    mo = old_pass(eng, td)
    # the old pass routed every recorded token to the rollout's experts: its log-probs equal a forced forward's
    lp = no_padding_2_padding(mo["log_probs"], td)
    for i, ref in enumerate(forced_forward_log_probs(model, td, routed)):
        torch.testing.assert_close(lp[i, : RESP_LENS[i]], ref, atol=1e-5, rtol=0)
    # "old" experts are the rollout's; the old router's own top-K is kept for the agreement metrics
    for i, got in enumerate(mo[rv.OLD_IDX].unbind()):
        want = routed[i, max(PROMPT_LENS) - PROMPT_LENS[i] :][: got.shape[0]]
        assert torch.equal(got[:-1].long(), want[:-1].long())
    up = with_old(td, mo)
    up[rv.OWN_IDX] = mo[rv.OWN_IDX]
    _loss, out = update(eng, up, cfg)
    assert out["metrics"]["router/gamma_mean"] == 1.0  # unchanged weights: the same experts, the same router
    assert 0 <= out["metrics"]["router/rollout_disagree_tokens"] <= 1
    agreement = {k: v for k, v in out["metrics"].items() if k.startswith("router/rollout_")}
    # GRPO+R3 (no router shift, no gamma) reports the same agreement
    _loss, out_grpo = update(eng, up, rv.VerlRSPOConfig(objective="grpo", routing_control="replay_rollout"))
    assert "router/gamma_mean" not in out_grpo["metrics"]
    assert {k: v for k, v in out_grpo["metrics"].items() if k.startswith("router/rollout_")} == agreement
    cap = eng._rspo_capture
    assert cap.step.routers.replaying  # on through the backward, until the next forward starts
    ref = make_batch(0)
    tu.assign_non_tensor(ref, calculate_entropy=False)
    with torch.no_grad():
        cap.before(ref)  # the next forward (here a reference log-prob pass, which the plugin leaves alone)
    assert not cap.step.routers.replaying


def test_r3_needs_the_rollouts_experts(model):
    eng = make_engine(model)
    rv.install_capture(eng, rv.VerlRSPOConfig(routing_control="replay_rollout"))
    with pytest.raises(KeyError, match="enable_rollout_routing_replay=true"):
        old_pass(eng, make_batch(0))
    with pytest.raises(ValueError, match="routing_control='replay_indices'"):
        rv.VerlRSPOConfig(routing_control="replay_indices")


def test_dump_records_what_recomputes_the_loss(tmp_path, monkeypatch):
    """RSPO_VERL_DUMP_DIR (what the end-to-end run checks verl's logged loss with): the dumped call recomputes,
    with the naive loops, to the loss the plugin returned."""
    from tests.naive import verl_loss_from_dump

    monkeypatch.setattr(rv, "_dump_calls", 0)
    monkeypatch.setenv(rv.DUMP_ENV, str(tmp_path))
    td, mo = loss_inputs(4)
    tu.assign_non_tensor(td, batch_num_tokens=int(td["response_mask"].sum()), global_batch_size=8, dp_size=2)
    loss, _ = rv.rspo_ppo_loss(actor_config(clip_ratio=0.4), mo, td, rspo=rv.VerlRSPOConfig())
    (path,) = tmp_path.iterdir()
    assert path.name == "loss-r0-00000.pt"
    rec = torch.load(path, weights_only=False)
    gamma, raw, scaled = verl_loss_from_dump(rec)
    valid = rec["mask"] > 0
    torch.testing.assert_close(rec["gamma"][valid], torch.tensor(gamma, dtype=F64)[valid], atol=1e-12, rtol=0)
    assert float(rec["gamma"][valid].min()) < 0.99
    assert rec["partial_sum"] is True
    assert abs(float(rec["loss"]) - raw) < 1e-12
    assert abs(float(loss.detach()) - scaled) < 1e-12 and abs(float(rec["policy_loss"]) - scaled) < 1e-12
