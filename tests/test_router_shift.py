"""rspo.routing router-shift math: hand cases, naive-loop equivalence, properties, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rspo.routing import (
    non_shifted_ratio,
    router_clip_mask,
    router_shift_log_ratio,
    router_shift_ratio,
    router_shift_ratio_with_grad,
)
from tests import naive

F64 = torch.float64


# One token, L=2 layers, K=2 old experts (probabilities of the OLD top-2 under old / new router):
#   layer 0: old [0.5, 0.25] new [0.25, 0.25]  -> d = [log 2, 0]
#   layer 1: old [0.4, 0.4]  new [0.8, 0.2]    -> d = [log 2, log 2]
# log_mean: log g_0 = -log2/2, log g_1 = -log 2
#   geo_mean: gamma = 2^(-(0.5 + 1)/2) = 2^-0.75;   product: 2^-1.5 = 0.354 (floored at 0.5 by default)
# mean_exp: g_0 = (1/2 + 1)/2 = 0.75, g_1 = (1/2 + 1/2)/2 = 0.5
#   geo_mean: (0.375)^(1/2);   product: 0.375
def hand():
    old = torch.log(torch.tensor([[[[0.5, 0.25], [0.4, 0.4]]]], dtype=F64))
    new = torch.log(torch.tensor([[[[0.25, 0.25], [0.8, 0.2]]]], dtype=F64))
    return old, new


@pytest.mark.parametrize(
    ("expert_agg", "layer_agg", "gamma_min", "expected"),
    [
        ("log_mean", "geo_mean", 0.5, 2**-0.75),
        ("log_mean", "product", 0.5, 0.5),
        ("log_mean", "product", 1e-12, 2**-1.5),
        ("mean_exp", "geo_mean", 0.5, 0.375**0.5),
        ("mean_exp", "product", 0.2, 0.375),
        ("mean_exp", "product", 0.8, 0.8),
    ],
)
def test_hand_cases(expert_agg, layer_agg, gamma_min, expected):
    old, new = hand()
    g = router_shift_ratio(old, new, expert_agg=expert_agg, layer_agg=layer_agg, gamma_min=gamma_min)
    assert g.shape == (1, 1)
    assert g.item() == pytest.approx(expected, abs=1e-12)


def test_eps_clamp():
    # old probability 0 (log = -inf) is clamped at eps=1e-4: d = |log 0.01 - log 1e-4| = log 100
    old = torch.tensor([[[[-math.inf]]]], dtype=F64)
    new = torch.log(torch.tensor([[[[0.01]]]], dtype=F64))
    g = router_shift_ratio(old, new, eps=1e-4, gamma_min=1e-12)
    assert g.item() == pytest.approx(0.01, abs=1e-12)


def test_identity_gives_exactly_one_and_is_detached():
    old = torch.randn(3, 4, 5, 2, dtype=torch.float32).log_softmax(-1)
    new = old.clone().requires_grad_(True)
    g = router_shift_ratio(old, new)
    assert torch.all(g == 1.0)
    assert not g.requires_grad


def test_with_grad_variant_has_gradient_and_same_value():
    torch.manual_seed(0)
    old = torch.randn(2, 3, 4, 2, dtype=F64).log_softmax(-1)
    new = (old + 0.2 * torch.randn_like(old)).clamp(max=0.0).requires_grad_(True)
    g0 = router_shift_ratio(old, new, gamma_min=1e-12)
    g1 = router_shift_ratio_with_grad(old, new, gamma_min=1e-12)
    torch.testing.assert_close(g0, g1.detach(), atol=0, rtol=0)
    g1.sum().backward()
    assert new.grad is not None and new.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 3, 2), (4, 3, 6, 8)])
@pytest.mark.parametrize("expert_agg", ["log_mean", "mean_exp"])
@pytest.mark.parametrize("layer_agg", ["geo_mean", "product"])
def test_naive_equivalence(seed, shape, expert_agg, layer_agg):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g, dtype=F64) * 5
    new = (old + 0.5 * torch.randn(shape, generator=g, dtype=F64)).clamp(max=0.0)  # log-probs are <= 0
    got = router_shift_ratio(old, new, expert_agg=expert_agg, layer_agg=layer_agg, gamma_min=0.3)
    ref = naive.router_shift(old.tolist(), new.tolist(), expert_agg=expert_agg, layer_agg=layer_agg, gamma_min=0.3)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), atol=1e-10, rtol=0)


logps = st.lists(st.floats(min_value=-30, max_value=0, allow_nan=False), min_size=6, max_size=6)


@settings(max_examples=200, deadline=None)
@given(old=logps, new=logps, gamma_min=st.floats(1e-12, 1))
def test_properties(old, new, gamma_min):
    o = torch.tensor(old, dtype=F64).view(1, 1, 3, 2)
    n = torch.tensor(new, dtype=F64).view(1, 1, 3, 2)
    lm = router_shift_ratio(o, n, gamma_min=gamma_min)
    me = router_shift_ratio(o, n, expert_agg="mean_exp", gamma_min=gamma_min)
    pr = router_shift_ratio(o, n, layer_agg="product", gamma_min=gamma_min)
    for g in (lm, me, pr):
        assert gamma_min <= g.item() <= 1.0
    assert me.item() >= lm.item() - 1e-12  # Jensen: mean of exp >= exp of mean
    assert pr.item() <= lm.item() + 1e-12  # product shrinks faster than the geometric mean
    # symmetric in old/new (absolute difference)
    assert router_shift_ratio(n, o, gamma_min=gamma_min).item() == pytest.approx(lm.item(), abs=1e-12)


def test_log_ratio_is_unfloored():
    old, new = hand()
    assert router_shift_log_ratio(old, new, layer_agg="product").item() == pytest.approx(-1.5 * math.log(2), abs=1e-12)


def test_errors():
    old, new = hand()
    with pytest.raises(ValueError, match="expert_agg='mean'; valid values: log_mean, mean_exp"):
        router_shift_ratio(old, new, expert_agg="mean")
    with pytest.raises(ValueError, match="layer_agg='sum'; valid values: geo_mean, product"):
        router_shift_ratio(old, new, layer_agg="sum")
    with pytest.raises(ValueError, match=r"new_logp_topk has shape \(1, 1, 2, 1\)"):
        router_shift_ratio(old, new[..., :1])
    with pytest.raises(ValueError, match=r"old_logp_topk must be a float tensor \(B, T, L, K\)"):
        router_shift_ratio(old[0], new[0])
    with pytest.raises(ValueError, match="gamma_min must be in"):
        router_shift_ratio(old, new, gamma_min=1.5)
    with pytest.raises(ValueError, match="dtype"):
        router_shift_ratio(old, new.float())


@pytest.mark.parametrize("fn", [router_shift_ratio, router_shift_ratio_with_grad, router_shift_log_ratio])
def test_bad_log_probabilities_are_errors_never_passed_on(fn):
    """NaN is a NonFiniteError naming the tensor (the trainer counts it like a non-finite loss); +inf and
    positive log-probabilities (probabilities above 1) are ValueErrors; gamma_min=0 is rejected."""
    from rspo.errors import NonFiniteError

    old, new = hand()
    bad_nan = new.clone()
    bad_nan[0, 0, 1, 0] = math.nan
    with pytest.raises(NonFiniteError, match="new_logp_topk has 1 NaN"):
        fn(old, bad_nan)
    with pytest.raises(NonFiniteError, match="old_logp_topk has 1 NaN"):
        fn(bad_nan, new)
    for v in (math.inf, 0.25):
        bad = old.clone()
        bad[0, 0, 0, 1] = v
        with pytest.raises(ValueError, match=r"old_logp_topk has 1 positive entries .* must be <= 0"):
            fn(bad, new)
    minus_inf = old.clone()
    minus_inf[0, 0, 0, 0] = -math.inf  # probability 0 is legal: clamped at eps
    assert torch.isfinite(fn(minus_inf, new)).all()
    if fn is not router_shift_log_ratio:
        with pytest.raises(ValueError, match=r"gamma_min must be in \(0, 1\], got 0"):
            fn(old, new, gamma_min=0)


def test_non_shifted_ratio():
    # B=1, T=3, L=2, K=2. Token 0: same sets (order swapped in layer 1) -> unshifted.
    # Token 1: layer 1 differs -> shifted. Token 2: padding.
    old = torch.tensor([[[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 1], [0, 1]]]])
    new = torch.tensor([[[[1, 0], [3, 2]], [[4, 5], [6, 1]], [[7, 6], [5, 4]]]])
    mask = torch.tensor([[1, 1, 0]])
    assert non_shifted_ratio(old, new, mask) == 0.5
    assert non_shifted_ratio(old, old, mask) == 1.0
    assert math.isnan(non_shifted_ratio(old, new, torch.zeros(1, 3)))
    with pytest.raises(ValueError, match="integer"):
        non_shifted_ratio(old.float(), new.float(), mask)
    with pytest.raises(ValueError, match="mask has shape"):
        non_shifted_ratio(old, new, torch.ones(2, 3))


def test_router_clip_mask():
    gamma = torch.tensor([[0.5, 0.9, 0.6]])
    mask = torch.tensor([[1, 1, 0]])
    assert router_clip_mask(gamma, mask, 0.7).tolist() == [[True, False, False]]


def test_gamma_histogram_shares_and_quantiles_by_hand():
    from rspo.routing import GAMMA_EDGES, gamma_histogram, histogram_quantile, histogram_share_below

    # 10 tokens: four exactly 1, one in (0.999, 0.9999], two at 0.96, one at 0.95, one at 0.9, one at 0.55;
    # the last position is padding (excluded)
    gamma = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.9995, 0.96, 0.96, 0.95, 0.9, 0.55, 0.1]], dtype=F64)
    mask = torch.tensor([[1] * 10 + [0]])
    hist = gamma_histogram(gamma, mask)
    assert sum(hist) == 10 and hist[0] == 4 and len(hist) == len(GAMMA_EDGES)
    assert hist[GAMMA_EDGES.index(0.999)] == 1  # 0.999 <= g < 0.9999
    assert hist[GAMMA_EDGES.index(0.96)] == 2 and hist[GAMMA_EDGES.index(0.95)] == 1
    assert histogram_share_below(hist, 0.99) == pytest.approx(0.5, abs=1e-12)  # 0.96, 0.96, 0.95, 0.9, 0.55
    assert histogram_share_below(hist, 0.95) == pytest.approx(0.2, abs=1e-12)  # 0.9 and 0.55
    assert histogram_share_below(hist, 0.9) == pytest.approx(0.1, abs=1e-12)
    assert histogram_quantile(hist, 0.95) == 1.0  # more than 5% of tokens are exactly 1
    # the lowest 10%: the one token in [0.5, 0.6): linear within the bin
    assert histogram_quantile(hist, 0.1) == pytest.approx(0.6, abs=1e-12)
    assert histogram_quantile(hist, 0.05) == pytest.approx(0.55, abs=1e-12)
    with pytest.raises(ValueError, match="not a bin edge"):
        histogram_share_below(hist, 0.97123)
    assert math.isnan(histogram_quantile([0] * len(GAMMA_EDGES), 0.5))
