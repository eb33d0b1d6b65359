"""rspo.objectives: hand-computed cases, naive-loop equivalence, gradients and errors."""

from __future__ import annotations

import math

import pytest
import torch

from rspo.objectives import aggregate, compute_policy_loss, get_objective, list_objectives
from tests import naive

F64 = torch.float64


# ----------------------------------------------------------------------------------------
# The 2x3 hand case used throughout:
#   mask = [[1, 1, 1], [1, 1, 0]],  A = [+1, -1]
#   w    = [[1.5, 1.0, 0.5], [1.1, 0.7, e^5 (padding)]]     (dl = log w)
#   g    = [[0.5, 1.0, 0.8], [1.0, 0.5, 1.0]]
# ----------------------------------------------------------------------------------------
def hand_batch():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, -4.0]], dtype=F64)
    w = torch.tensor([[1.5, 1.0, 0.5], [1.1, 0.7, math.exp(5.0)]], dtype=F64)
    lp = (old + torch.log(w)).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    gamma = torch.tensor([[0.5, 1.0, 0.8], [1.0, 0.5, 1.0]], dtype=F64)
    return lp, old, adv, mask, gamma


def loss_of(name, rs=False, **hp):
    lp, old, adv, mask, gamma = hand_batch()
    return compute_policy_loss(name, lp, old, adv, mask, router_shift=gamma if rs else None, **hp)


# GRPO, clip 0.2. Per token max(-A w, -A clip(w, 0.8, 1.2)):
#   seq 0 (A=+1): w=1.5 -> max(-1.5, -1.2) = -1.2;  w=1 -> -1;  w=0.5 -> max(-0.5, -0.8) = -0.5
#   seq 1 (A=-1): w=1.1 -> max(1.1, 1.1) = 1.1;     w=0.7 -> max(0.7, 0.8) = 0.8
#   seq-mean-token-mean: (-2.7/3 + 1.9/2) / 2 = (-0.9 + 0.95) / 2 = 0.025
#   token-mean: (-2.7 + 1.9) / 5 = -0.16;  seq-mean-token-sum-norm (norm 3): (-2.7 + 1.9) / 2 / 3
#   clip active: high at (0,0) (w>1.2, A>0), low at (1,1) (w<0.8, A<0): 1/5 each
def test_grpo_hand():
    loss, m = loss_of("grpo")
    assert loss.item() == pytest.approx(0.025, abs=1e-12)
    assert m["clip_ratio/high_mean"] == pytest.approx(0.2, abs=1e-12)
    assert m["clip_ratio/low_mean"] == pytest.approx(0.2, abs=1e-12)
    assert m["clip_ratio/region_mean"] == pytest.approx(0.4, abs=1e-12)
    assert loss_of("grpo", loss_agg="token-mean")[0].item() == pytest.approx(-0.16, abs=1e-12)
    got = loss_of("grpo", loss_agg="seq-mean-token-sum-norm", norm_length=3)[0].item()
    assert got == pytest.approx(-0.8 / 6, abs=1e-12)
    # ratio stats over the 5 response tokens: w = 1.5, 1, 0.5, 1.1, 0.7 (padding e^5 excluded)
    ws = torch.tensor([1.5, 1.0, 0.5, 1.1, 0.7], dtype=F64)
    assert m["ratio/mean"] == pytest.approx(0.96, abs=1e-12)
    assert m["ratio/max"] == pytest.approx(1.5, abs=1e-12)
    assert m["ratio/min"] == pytest.approx(0.5, abs=1e-12)
    assert m["ratio/std"] == pytest.approx(ws.std(correction=0).item(), abs=1e-12)
    assert m["kl/approx"] == pytest.approx((ws - 1 - ws.log()).mean().item(), abs=1e-12)


# GRPO+RS after clip: gamma times the clipped token loss.
#   seq 0: -1.2*0.5 = -0.6, -1*1 = -1, -0.5*0.8 = -0.4 -> mean -2/3
#   seq 1:  1.1*1 = 1.1,   0.8*0.5 = 0.4            -> mean 0.75      loss = (-2/3 + 0.75)/2 = 1/24
# GRPO+RS before clip: w' = w g = [[0.75, 1, 0.4], [1.1, 0.35]]
#   seq 0: max(-0.75, -0.8) = -0.75, -1, max(-0.4, -0.8) = -0.4 -> mean -2.15/3
#   seq 1: max(1.1, 1.1) = 1.1, max(0.35, 0.8) = 0.8          -> mean 0.95   loss = (-2.15/3 + 0.95)/2
#   clip active: none high (0.75 < 1.2), low at (1,1) (0.35 < 0.8, A<0): 1/5
def test_grpo_router_shift_hand():
    assert loss_of("grpo", rs=True)[0].item() == pytest.approx(1 / 24, abs=1e-12)
    loss, m = loss_of("grpo", rs=True, router_shift_placement="before_clip")
    assert loss.item() == pytest.approx((-2.15 / 3 + 0.95) / 2, abs=1e-12)
    assert m["clip_ratio/high_mean"] == 0.0
    assert m["clip_ratio/low_mean"] == pytest.approx(0.2, abs=1e-12)


# GSPO with clip 0.2 (so that nothing binds): s0 = (1.5*1*0.5)^(1/3) = 0.75^(1/3), s1 = (1.1*0.7)^(1/2)
#   loss = (-s0 + s1) / 2
# GSPO+RS after: G0 = (0.5*1*0.8)^(1/3) = 0.4^(1/3), G1 = 0.5^(1/2): loss = (-(0.3)^(1/3) + 0.385^(1/2))/2
# GSPO+RS before: s0' = 0.3^(1/3) = 0.669 (A>0, below 1.2: unclipped); s1' = 0.385^(1/2) = 0.620
#   (A<0, below 0.8: clipped to 0.8): loss = (-(0.3)^(1/3) + 0.8) / 2
@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_hand(name):
    hp = {"clip_low": 0.2, "clip_high": 0.2}
    assert loss_of(name, **hp)[0].item() == pytest.approx((-(0.75 ** (1 / 3)) + 0.77**0.5) / 2, abs=1e-12)
    got = loss_of(name, rs=True, **hp)[0].item()
    assert got == pytest.approx((-(0.3 ** (1 / 3)) + 0.385**0.5) / 2, abs=1e-12)
    loss, m = loss_of(name, rs=True, router_shift_placement="before_clip", **hp)
    assert loss.item() == pytest.approx((-(0.3 ** (1 / 3)) + 0.8) / 2, abs=1e-12)
    # sequence 1 (2 tokens) is low-clipped: 2 of 5 response tokens
    assert m["clip_ratio/low_mean"] == pytest.approx(0.4, abs=1e-12)


# GMPO, clip 0.4 in log space:
#   seq 0 (A>0): dl = [log 1.5 = 0.405, 0, log 0.5]; upper bound binds only: [0.4, 0, log 0.5]
#     R0 = exp((0.4 + log 0.5)/3)
#   seq 1 (A<0): dl = [log 1.1, log 0.7 = -0.357]; lower bound -0.4 not reached: R1 = 0.77^(1/2)
#   loss = mean(-R0, +R1);  clip active: (0,0) high only -> high 1/5, low 0 ((0,2) has A>0)
def test_gmpo_hand():
    loss, m = loss_of("gmpo")
    assert loss.item() == pytest.approx((-math.exp((0.4 + math.log(0.5)) / 3) + 0.77**0.5) / 2, abs=1e-12)
    assert m["clip_ratio/high_mean"] == pytest.approx(0.2, abs=1e-12)
    assert m["clip_ratio/low_mean"] == 0.0


# RSPO after clip: add log g to the clipped log-ratios.
#   seq 0: 0.4 + log 0.5 + (log 0.5 + log 0.8) = 0.4 + log 0.2  -> R0 = exp((0.4 + log 0.2)/3)
#   seq 1: log 0.77 + log 0.5 = log 0.385                       -> R1 = 0.385^(1/2)
# RSPO before clip: dl' = dl + log g
#   seq 0: [log 0.75, 0, log 0.4]: A>0, all below 0.4 -> R0 = 0.3^(1/3)
#   seq 1: [log 1.1, log 0.35 = -1.05]: A<0, lower bound binds -> R1 = exp((log 1.1 - 0.4)/2)
#   clip active: low at (1,1): 1/5
# RSPO eq5_literal: seq 1 has A<0, adds -log g: log 0.77 - log 0.5 = log 1.54 -> R1 = 1.54^(1/2)
def test_rspo_hand():
    loss, m = loss_of("rspo", rs=True)
    assert loss.item() == pytest.approx((-math.exp((0.4 + math.log(0.2)) / 3) + 0.385**0.5) / 2, abs=1e-12)
    # gamma's distribution is the routing step's to report (rspo.routing.step.router_metrics), not the loss's
    assert not [k for k in m if k.startswith("router/")]
    loss, m = loss_of("rspo", rs=True, router_shift_placement="before_clip")
    assert loss.item() == pytest.approx((-(0.3 ** (1 / 3)) + math.exp((math.log(1.1) - 0.4) / 2)) / 2, abs=1e-12)
    assert m["clip_ratio/low_mean"] == pytest.approx(0.2, abs=1e-12)
    assert m["clip_ratio/high_mean"] == 0.0
    loss, _ = loss_of("rspo", rs=True, router_shift_form="eq5_literal")
    assert loss.item() == pytest.approx((-math.exp((0.4 + math.log(0.2)) / 3) + 1.54**0.5) / 2, abs=1e-12)


# Router clip (paper snippet's router_clip_mask), threshold 0.6: tokens (0,0) and (1,1) have g = 0.5.
#   report only: loss unchanged, router/clip_frac = 2/5
#   drop: seq 0 keeps tokens 1, 2: dl_c = [0, log 0.5], log g = [0, log 0.8] -> R0 = 0.4^(1/2)
#         seq 1 keeps token 0: R1 = 1.1                                  loss = (-0.4^(1/2) + 1.1)/2
def test_router_clip_hand():
    base, _ = loss_of("rspo", rs=True)
    loss, m = loss_of("rspo", rs=True, router_clip_threshold=0.6)
    assert loss.item() == base.item()
    assert m["router/clip_frac"] == pytest.approx(0.4, abs=1e-12)
    loss, m = loss_of("rspo", rs=True, router_clip_threshold=0.6, router_clip_drop=True)
    assert loss.item() == pytest.approx((-(0.4**0.5) + 1.1) / 2, abs=1e-12)


def test_aggregate_empty_rows_excluded():
    loss_mat = torch.tensor([[1.0, 3.0], [5.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=F64)
    assert aggregate(loss_mat, mask, "seq-mean-token-mean").item() == 2.0
    assert aggregate(loss_mat, mask, "token-mean").item() == 2.0
    assert aggregate(loss_mat, mask, "seq-mean-token-sum-norm", norm_length=4).item() == 1.0


# ----------------------------------------------------------------------------------------
# Equivalence with the naive per-token loops on random inputs
# ----------------------------------------------------------------------------------------
def random_batch(seed: int, b: int, t: int, per_token_adv: bool = False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=F64) * 4
    lp = old + 0.4 * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    adv[torch.rand(b, generator=g) < 0.2] = 0.0  # zero advantages too
    if per_token_adv:
        adv = adv[:, None] + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).to(F64)
    if b > 2:
        mask[1] = 0  # a fully padded row
        mask[0] = 1
    gamma = (0.3 + 0.7 * torch.rand(b, t, generator=g, dtype=F64)).clamp(max=1.0)
    return lp, old, adv, mask, gamma


def as_lists(*ts):
    return [x.tolist() for x in ts]


SHAPES = [(1, 1), (3, 5), (8, 17), (16, 9)]
SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_naive_equivalence(seed, shape, per_token_adv):
    lp, old, adv, mask, gamma = random_batch(seed, *shape, per_token_adv=per_token_adv)
    adv_bt = adv if adv.dim() == 2 else adv[:, None].expand_as(lp)
    L = as_lists(lp, old, adv_bt, mask, gamma)
    lpl, oldl, advl, maskl, gl = L
    cases = []
    for agg, nl in [("token-mean", None), ("seq-mean-token-mean", None), ("seq-mean-token-sum-norm", 7.0)]:
        for rs, pl in [(False, "after_clip"), (True, "after_clip"), (True, "before_clip")]:
            hp = {"clip_low": 0.2, "clip_high": 0.28, "loss_agg": agg}
            if nl:
                hp["norm_length"] = nl
            kw = {"router_shift_placement": pl} if rs else {}
            ref = naive.grpo(
                lpl,
                oldl,
                advl,
                maskl,
                gl if rs else None,
                norm_length=nl,
                placement=pl,
                clip_low=0.2,
                clip_high=0.28,
                loss_agg=agg,
            )
            cases.append(("grpo", rs, {**hp, **kw}, ref))
    for name in ["gspo"] + (["gspo_token"] if not per_token_adv else []):
        for rs, pl in [(False, "after_clip"), (True, "after_clip"), (True, "before_clip")]:
            kw = {"router_shift_placement": pl} if rs else {}
            hp = {"clip_low": 0.05, "clip_high": 0.08}
            ref = naive.gspo(lpl, oldl, advl, maskl, gl if rs else None, placement=pl, **hp)
            cases.append((name, rs, {**hp, **kw}, ref))
    cases.append(
        (
            "gmpo",
            False,
            {"clip_low": 0.3, "clip_high": 0.2},
            naive.gmpo(lpl, oldl, advl, maskl, None, clip_low=0.3, clip_high=0.2),
        )
    )
    for pl, form in [("after_clip", "weight"), ("before_clip", "weight"), ("after_clip", "eq5_literal")]:
        hp = {"clip_low": 0.3, "clip_high": 0.2, "router_shift_placement": pl, "router_shift_form": form}
        ref = naive.gmpo(lpl, oldl, advl, maskl, gl, clip_low=0.3, clip_high=0.2, placement=pl, form=form)
        cases.append(("rspo", True, hp, ref))
    for name, rs, hp, ref in cases:
        loss, _ = compute_policy_loss(name, lp, old, adv, mask, router_shift=gamma if rs else None, **hp)
        assert loss.item() == pytest.approx(ref, abs=1e-10, rel=0), (name, rs, hp)


# ----------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------
def grad_of(name, lp, old, adv, mask, gamma=None, **hp):
    lp = lp.detach().clone().requires_grad_(True)
    loss, _ = compute_policy_loss(name, lp, old, adv, mask, router_shift=gamma, **hp)
    loss.backward()
    return lp.grad


@pytest.mark.parametrize("name", ["grpo", "gspo", "gspo_token", "rspo"])
def test_gamma_gets_no_gradient_by_default(name):
    lp, old, adv, mask, gamma = random_batch(0, 4, 6)
    hp = {"clip_low": 0.5, "clip_high": 0.5} if name.startswith("gspo") else {}  # 3e-4 clips everything here
    gamma = gamma.clone().requires_grad_(True)
    lp = lp.clone().requires_grad_(True)
    loss, _ = compute_policy_loss(name, lp, old, adv, mask, router_shift=gamma, **hp)
    loss.backward()
    assert gamma.grad is None
    assert lp.grad is not None and lp.grad.abs().sum() > 0
    # The ablation lets gradients into gamma.
    gamma2 = gamma.detach().clone().requires_grad_(True)
    loss, _ = compute_policy_loss(name, lp, old, adv, mask, router_shift=gamma2, router_shift_grad=True, **hp)
    loss.backward()
    assert gamma2.grad is not None and gamma2.grad.abs().sum() > 0


def test_old_log_probs_get_no_gradient():
    lp, old, adv, mask, _ = random_batch(1, 4, 6)
    old = old.clone().requires_grad_(True)
    for name in ["grpo", "gspo", "gspo_token", "gmpo"]:
        lp2 = lp.clone().requires_grad_(True)
        compute_policy_loss(name, lp2, old, adv, mask)[0].backward()
        assert old.grad is None, name


@pytest.mark.parametrize("rs", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_token_gradient_equals_gspo(seed, rs):
    lp, old, adv, mask, gamma = random_batch(seed, 6, 7)
    hp = {"clip_low": 0.05, "clip_high": 0.05}
    g = gamma if rs else None
    ga = grad_of("gspo", lp, old, adv, mask, g, **hp)
    gb = grad_of("gspo_token", lp, old, adv, mask, g, **hp)
    assert ga.abs().sum() > 0
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list_objectives())
def test_masked_positions_get_zero_gradient(name):
    lp, old, adv, mask, gamma = random_batch(3, 5, 8)
    g = gamma if get_objective(name).router_shift == "required" else None
    hp = {"clip_low": 0.5, "clip_high": 0.5} if name.startswith("gspo") else {}
    grad = grad_of(name, lp, old, adv, mask, g, **hp)
    assert torch.all(grad[mask == 0] == 0)
    assert grad[mask > 0].abs().sum() > 0


def test_clipped_tokens_get_zero_gradient_grpo():
    lp, old, _, mask, _ = hand_batch()
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    grad = grad_of("grpo", lp, old, adv, mask, loss_agg="token-mean")
    # (0,0): w=1.5 > 1.2 with A>0 -> clipped; (1,1): w=0.7 < 0.8 with A<0 -> clipped
    assert grad[0, 0] == 0 and grad[1, 1] == 0
    # unclipped: d/dlogp of -A w / 5 = -A w / 5
    assert grad[0, 1].item() == pytest.approx(-1.0 / 5, abs=1e-12)
    assert grad[0, 2].item() == pytest.approx(-0.5 / 5, abs=1e-12)  # w=0.5 < 0.8 but A>0: not clipped
    assert grad[1, 0].item() == pytest.approx(1.1 / 5, abs=1e-12)


def test_clipped_tokens_get_zero_gradient_gmpo_and_gspo():
    lp, old, adv, mask, gamma = hand_batch()
    grad = grad_of("gmpo", lp, old, adv, mask)
    assert grad[0, 0] == 0  # dl = 0.405 > 0.4 with A>0
    assert grad[0, 2] != 0  # dl = -0.69 < -0.4 but A>0: one-sided, not clipped
    grad = grad_of("rspo", lp, old, adv, mask, gamma, router_shift_placement="before_clip")
    assert grad[1, 1] == 0 and grad[1, 0] != 0  # dl' = log 0.35 < -0.4 with A<0
    # GSPO before-clip: sequence 1 is clipped as a whole (s' = 0.62 < 0.8, A<0)
    grad = grad_of("gspo", lp, old, adv, mask, gamma, router_shift_placement="before_clip", clip_low=0.2, clip_high=0.2)
    assert torch.all(grad[1] == 0) and torch.all(grad[0] != 0)


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------
def test_unknown_name_lists_valid():
    lp, old, adv, mask, _ = hand_batch()
    with pytest.raises(ValueError, match="unknown objective 'ppo'.*grpo, gspo, gspo_token, gmpo, rspo"):
        compute_policy_loss("ppo", lp, old, adv, mask)


def test_unknown_hparam_lists_valid():
    lp, old, adv, mask, _ = hand_batch()
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['clip_ratio'\].*valid: clip_low, clip_high"):
        compute_policy_loss("grpo", lp, old, adv, mask, clip_ratio=0.2)
    with pytest.raises(ValueError, match="loss_agg='token_mean'.*valid values: token-mean"):
        compute_policy_loss("grpo", lp, old, adv, mask, loss_agg="token_mean")
    with pytest.raises(ValueError, match="norm_length"):
        compute_policy_loss("grpo", lp, old, adv, mask, loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="norm_length is only used"):
        compute_policy_loss("grpo", lp, old, adv, mask, norm_length=10)
    with pytest.raises(ValueError, match="unknown hyperparameter.*loss_agg"):
        compute_policy_loss("gmpo", lp, old, adv, mask, loss_agg="token-mean")
    with pytest.raises(ValueError, match="clip_low must be a finite number"):
        compute_policy_loss("gmpo", lp, old, adv, mask, clip_low=-0.1)


def test_router_shift_errors():
    lp, old, adv, mask, gamma = hand_batch()
    with pytest.raises(ValueError, match="'gmpo' does not use router_shift.*'rspo' = gmpo"):
        compute_policy_loss("gmpo", lp, old, adv, mask, router_shift=gamma)
    with pytest.raises(ValueError, match="'rspo' needs router_shift"):
        compute_policy_loss("rspo", lp, old, adv, mask)
    with pytest.raises(ValueError, match="only apply when router_shift is given"):
        compute_policy_loss("grpo", lp, old, adv, mask, router_shift_placement="before_clip")
    with pytest.raises(ValueError, match="router_shift_placement='inside'.*after_clip, before_clip"):
        compute_policy_loss("rspo", lp, old, adv, mask, router_shift=gamma, router_shift_placement="inside")
    with pytest.raises(ValueError, match=r"router_shift \(gamma\) must lie in \(0, 1\]"):
        compute_policy_loss("rspo", lp, old, adv, mask, router_shift=gamma * 2)
    with pytest.raises(ValueError, match="eq5_literal"):
        compute_policy_loss(
            "rspo",
            lp,
            old,
            adv,
            mask,
            router_shift=gamma,
            router_shift_form="eq5_literal",
            router_shift_placement="before_clip",
        )
    with pytest.raises(ValueError, match="router_clip_drop=True needs router_clip_threshold"):
        compute_policy_loss("rspo", lp, old, adv, mask, router_shift=gamma, router_clip_drop=True)


def test_shape_and_dtype_errors_name_the_tensor():
    lp, old, adv, mask, gamma = hand_batch()
    with pytest.raises(ValueError, match=r"old_log_probs has shape \(2, 2\), expected \(2, 3\)"):
        compute_policy_loss("grpo", lp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match=r"response_mask has shape"):
        compute_policy_loss("grpo", lp, old, adv, mask[:1])
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\), expected \(2,\) or \(2, 3\)"):
        compute_policy_loss("grpo", lp, old, torch.zeros(3, dtype=F64), mask)
    with pytest.raises(ValueError, match="old_log_probs has dtype torch.float32"):
        compute_policy_loss("grpo", lp, old.float(), adv, mask)
    with pytest.raises(ValueError, match="advantages has dtype torch.float32"):
        compute_policy_loss("grpo", lp, old, adv.float(), mask)
    with pytest.raises(ValueError, match=r"router_shift has shape \(2, 2\)"):
        compute_policy_loss("rspo", lp, old, adv, mask, router_shift=gamma[:, :2])
    with pytest.raises(ValueError, match="log_probs must be a 2-D float tensor"):
        compute_policy_loss("grpo", lp[0], old, adv, mask)
    with pytest.raises(TypeError, match="advantages must be a torch.Tensor"):
        compute_policy_loss("grpo", lp, old, [1.0, -1.0], mask)


def test_bool_mask_and_float32_work():
    lp, old, adv, mask, _ = hand_batch()
    a, _ = compute_policy_loss("grpo", lp, old, adv, mask.bool())
    b, _ = compute_policy_loss("grpo", lp.float(), old.float(), adv.float(), mask.long())
    assert a.item() == pytest.approx(0.025, abs=1e-12)
    assert b.dtype == torch.float32 and b.item() == pytest.approx(0.025, abs=1e-6)


# ----------------------------------------------------------------------------------------
# Rollout-correction weights and the dual clip
# ----------------------------------------------------------------------------------------
def _weights(seed: int, b: int, t: int, zeros: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    w = 0.2 + 2.5 * torch.rand(b, t, generator=g, dtype=F64)
    if zeros:
        w[torch.rand(b, t, generator=g) < 0.15] = 0.0  # masked tokens (IcePop / MIS)
    return w


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 17)])
@pytest.mark.parametrize("form", ["token", "sequence"])
@pytest.mark.parametrize("zeros", [False, True])
def test_rollout_weights_naive_equivalence(seed, shape, form, zeros):
    lp, old, adv, mask, gamma = random_batch(seed, *shape)
    w_bt = _weights(seed, *shape, zeros)
    w = w_bt if form == "token" else w_bt[:, 0]
    adv_bt = adv[:, None].expand_as(lp)
    lpl, oldl, advl, maskl, gl = as_lists(lp, old, adv_bt, mask, gamma)
    wl = w.tolist()
    cases = [
        (
            "grpo",
            False,
            {"loss_agg": "token-mean"},
            naive.grpo(lpl, oldl, advl, maskl, loss_agg="token-mean", weights=wl),
        ),
        ("grpo", True, {}, naive.grpo(lpl, oldl, advl, maskl, gl, weights=wl)),
        ("grpo", False, {"dual_clip": 1.5}, naive.grpo(lpl, oldl, advl, maskl, dual_clip=1.5, weights=wl)),
        # per-sequence A: each token's loss is its sequence's, so token weights average arithmetically per sequence
        (
            "gspo_token",
            False,
            {"clip_low": 0.05, "clip_high": 0.08},
            naive.gspo(lpl, oldl, advl, maskl, clip_low=0.05, clip_high=0.08, weights=wl, reduce="arithmetic"),
        ),
    ]
    for reduce in ["geometric", "arithmetic"]:
        kw = {"rollout_weights_reduce": reduce} if form == "token" else {}
        cases += [
            (
                "gspo",
                False,
                {"clip_low": 0.05, "clip_high": 0.08, "dual_clip": 1.1, **kw},
                naive.gspo(
                    lpl, oldl, advl, maskl, clip_low=0.05, clip_high=0.08, dual_clip=1.1, weights=wl, reduce=reduce
                ),
            ),
            ("gmpo", False, {**kw}, naive.gmpo(lpl, oldl, advl, maskl, weights=wl, reduce=reduce)),
            ("rspo", True, {**kw}, naive.gmpo(lpl, oldl, advl, maskl, gl, weights=wl, reduce=reduce)),
        ]
    for name, rs, hp, ref in cases:
        loss, m = compute_policy_loss(
            name, lp, old, adv, mask, router_shift=gamma if rs else None, rollout_weights=w, **hp
        )
        assert loss.item() == pytest.approx(ref, abs=1e-10, rel=0), (name, rs, hp)
        assert 0.0 <= m["rollout/weight_zero_frac"] <= 1.0


@pytest.mark.parametrize("name", ["grpo", "gspo", "gspo_token", "gmpo"])
def test_unit_rollout_weights_change_nothing(name):
    lp, old, adv, mask, _ = random_batch(4, 6, 9)
    hp = {"clip_low": 0.05, "clip_high": 0.08} if name.startswith("gspo") else {}
    g0 = grad_of(name, lp, old, adv, mask, **hp)
    for w in (torch.ones(6, 9, dtype=F64), torch.ones(6, dtype=F64), torch.ones(6, 1, dtype=F64)):
        lpx = lp.detach().clone().requires_grad_(True)
        loss, m = compute_policy_loss(name, lpx, old, adv, mask, rollout_weights=w, **hp)
        ref, _ = compute_policy_loss(name, lp, old, adv, mask, **hp)
        loss.backward()
        assert loss.item() == ref.item()
        torch.testing.assert_close(lpx.grad, g0, rtol=0, atol=0)
        assert m["rollout/weight_mean"] == 1.0 and m["rollout/weight_zero_frac"] == 0.0


def test_rollout_weights_are_detached_and_scale_gradients_per_token():
    lp, old, adv, mask, _ = random_batch(5, 4, 6)
    w = torch.rand(4, 6, dtype=F64, requires_grad=True)
    lpx = lp.detach().clone().requires_grad_(True)
    loss, _ = compute_policy_loss("grpo", lpx, old, adv, mask, rollout_weights=w, loss_agg="token-mean")
    loss.backward()
    assert w.grad is None  # stop-gradient
    g0 = grad_of("grpo", lp, old, adv, mask, loss_agg="token-mean")
    torch.testing.assert_close(lpx.grad, g0 * w.detach() * mask, rtol=1e-12, atol=1e-15)


def test_rollout_weights_padding_may_hold_nan_and_zero_removes_a_sequence():
    lp, old, adv, mask, _ = random_batch(6, 5, 7)
    w = torch.ones(5, 7, dtype=F64)
    w[mask == 0] = float("nan")
    a, _ = compute_policy_loss("gmpo", lp, old, adv, mask, rollout_weights=w)
    b, _ = compute_policy_loss("gmpo", lp, old, adv, mask)
    assert a.item() == b.item()
    # one zero token weight zeroes its sequence under the geometric mean; the arithmetic mean keeps the rest
    w = torch.ones(5, 7, dtype=F64)
    w[0, 0] = 0.0
    lpx = lp.detach().clone().requires_grad_(True)
    loss, m = compute_policy_loss("gmpo", lpx, old, adv, mask, rollout_weights=w)
    loss.backward()
    assert torch.all(lpx.grad[0] == 0) and lpx.grad[2].abs().sum() > 0
    assert m["rollout/weight_zero_frac"] == pytest.approx(1 / 4)  # 4 sequences with tokens, one zeroed
    lpx = lp.detach().clone().requires_grad_(True)
    loss, _ = compute_policy_loss("gmpo", lpx, old, adv, mask, rollout_weights=w, rollout_weights_reduce="arithmetic")
    loss.backward()
    assert lpx.grad[0].abs().sum() > 0


def test_rollout_weight_errors_name_the_tensor():
    lp, old, adv, mask, _ = random_batch(7, 3, 4)
    with pytest.raises(ValueError, match=r"rollout_weights has shape \(4,\), expected \(3, 4\)"):
        compute_policy_loss("grpo", lp, old, adv, mask, rollout_weights=torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="rollout_weights has dtype torch.float32"):
        compute_policy_loss("grpo", lp, old, adv, mask, rollout_weights=torch.ones(3, 4))
    bad = torch.ones(3, 4, dtype=F64)
    bad[0, 0] = -0.5
    with pytest.raises(ValueError, match=r"finite and >= 0 on response tokens; got \[-0.5\]"):
        compute_policy_loss("grpo", lp, old, adv, mask, rollout_weights=bad)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="finite and >= 0"):
        compute_policy_loss("gmpo", lp, old, adv, mask, rollout_weights=bad)
    with pytest.raises(ValueError, match="rollout_weights_reduce applies to per-token weights with a sequence"):
        compute_policy_loss(
            "grpo", lp, old, adv, mask, rollout_weights=torch.ones(3, 4, dtype=F64), rollout_weights_reduce="geometric"
        )
    with pytest.raises(ValueError, match="rollout_weights_reduce applies"):
        compute_policy_loss(
            "gmpo", lp, old, adv, mask, rollout_weights=torch.ones(3, dtype=F64), rollout_weights_reduce="geometric"
        )
    with pytest.raises(ValueError, match="rollout_weights_reduce='median'; valid: geometric, arithmetic"):
        compute_policy_loss(
            "gmpo", lp, old, adv, mask, rollout_weights=torch.ones(3, 4, dtype=F64), rollout_weights_reduce="median"
        )
    with pytest.raises(ValueError, match="rollout_weights_reduce is given without rollout_weights"):
        compute_policy_loss("gmpo", lp, old, adv, mask, rollout_weights_reduce="geometric")


def test_dual_clip_hand():
    # A < 0, ratio e^2 = 7.39: the PPO term is 7.39 |A|, the dual clip caps it at 3 |A| with no gradient
    lp = torch.tensor([[2.0, 0.1]], dtype=F64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=F64)
    adv = torch.tensor([-1.0], dtype=F64)
    mask = torch.ones(1, 2, dtype=F64)
    loss, _ = compute_policy_loss("grpo", lp, old, adv, mask, dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx((3.0 + math.exp(0.1)) / 2, abs=1e-12)
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 1].item() == pytest.approx(math.exp(0.1) / 2, abs=1e-12)
    # A > 0: the dual clip never binds
    a, _ = compute_policy_loss("grpo", lp, old, -adv, mask, dual_clip=3.0)
    b, _ = compute_policy_loss("grpo", lp, old, -adv, mask)
    assert a.item() == b.item()


@pytest.mark.parametrize("seed", SEEDS)
def test_dual_clip_equals_trl_delta_formula(seed):
    """TRL's two-sided clip: coef_1 = min(w, delta); l = -min(coef_1 A, clip(w) A), for delta > 1 + eps_high."""
    lp, old, adv, mask, _ = random_batch(seed, 8, 11)
    lp = lp * 3  # ratios far from 1 on both sides
    eps_lo, eps_hi, delta = 0.2, 0.28, 1.6
    lpa = lp.detach().clone().requires_grad_(True)
    ours, _ = compute_policy_loss(
        "grpo", lpa, old, adv, mask, clip_low=eps_lo, clip_high=eps_hi, dual_clip=delta, loss_agg="token-mean"
    )
    ours.backward()
    lpb = lp.detach().clone().requires_grad_(True)
    w = torch.exp(lpb - old)
    a = adv[:, None]
    l_trl = -torch.minimum(torch.clamp(w, max=delta) * a, torch.clamp(w, 1 - eps_lo, 1 + eps_hi) * a)
    ref = (l_trl * mask).sum() / mask.sum()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-12)
    torch.testing.assert_close(lpa.grad, lpb.grad, rtol=0, atol=1e-14)


def test_dual_clip_errors():
    lp, old, adv, mask, _ = random_batch(0, 2, 3)
    with pytest.raises(ValueError, match=r"dual_clip must be a number > 1 \+ clip_high = 1.28"):
        compute_policy_loss("grpo", lp, old, adv, mask, clip_high=0.28, dual_clip=1.2)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['dual_clip'\] for objective 'gmpo'"):
        compute_policy_loss("gmpo", lp, old, adv, mask, dual_clip=3.0)
