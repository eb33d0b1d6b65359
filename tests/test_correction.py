"""rspo.correction: rollout-correction weights (TIS, IcePop / MIS) by hand, against naive loops, errors."""

from __future__ import annotations

import math

import pytest
import torch

from rspo.correction import RolloutCorrection, mismatch_metrics, rollout_weights

F64 = torch.float64


def test_token_truncate_and_mask_by_hand():
    # d = old - rollout: [log 3, log 0.5, -] and [log 1.5, pad, pad]
    old = torch.tensor([[math.log(0.3), math.log(0.1), 0.0], [math.log(0.6), 0.0, 0.0]], dtype=F64)
    roll = torch.tensor([[math.log(0.1), math.log(0.2), 0.0], [math.log(0.4), float("nan"), 5.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=F64)
    w, m = RolloutCorrection("token", "truncate", low=None, high=2.0).weights(old, roll, mask)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.0], [1.5, 1.0, 1.0]], dtype=F64), rtol=0, atol=1e-12)
    assert m["rollout/ratio_max"] == pytest.approx(3.0, abs=1e-12)
    assert m["rollout/ratio_min"] == pytest.approx(0.5, abs=1e-12)
    assert m["rollout/ratio_mean"] == pytest.approx(5 / 3, abs=1e-12)
    assert m["rollout/weight_mean"] == pytest.approx(4 / 3, abs=1e-12)
    assert m["rollout/truncated_frac"] == pytest.approx(1 / 3, abs=1e-12)
    assert m["rollout/logp_diff_max"] == pytest.approx(math.log(3), abs=1e-12)
    k3 = sum(r - 1 - math.log(r) for r in (3.0, 0.5, 1.5)) / 3
    assert m["rollout/kl_k3"] == pytest.approx(k3, abs=1e-12)
    assert m["rollout/nan_tokens"] == 0.0  # the NaN is at padding
    w, m = RolloutCorrection("token", "mask", low=0.6, high=2.0).weights(old, roll, mask)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 1.0], [1.5, 1.0, 1.0]], dtype=F64), rtol=0, atol=1e-12)
    assert m["rollout/masked_frac"] == pytest.approx(2 / 3, abs=1e-12)
    # without a correction: the token ratios and the token metrics alone, the same hand values
    diag = mismatch_metrics(old, roll, mask)
    assert set(diag) == {
        "rollout/ratio_min",
        "rollout/ratio_mean",
        "rollout/ratio_max",
        "rollout/logp_diff_mean",
        "rollout/logp_diff_max",
        "rollout/kl_k3",
        "rollout/nan_tokens",
    }
    assert (diag["rollout/ratio_min"], diag["rollout/ratio_max"]) == pytest.approx((0.5, 3.0), abs=1e-12)
    assert diag["rollout/ratio_mean"] == pytest.approx(5 / 3, abs=1e-12)
    assert diag["rollout/kl_k3"] == pytest.approx(k3, abs=1e-12)
    # sequence level: the product 3 * 0.5 = 1.5 and 1.5; geometric: sqrt(1.5) and 1.5
    w, _ = RolloutCorrection("sequence", "truncate", high=1.4).weights(old, roll, mask)
    torch.testing.assert_close(w, torch.tensor([1.4, 1.4], dtype=F64), rtol=0, atol=1e-12)
    w, _ = RolloutCorrection("geometric", "mask", low=0.5, high=1.4).weights(old, roll, mask)
    torch.testing.assert_close(w, torch.tensor([math.sqrt(1.5), 0.0], dtype=F64), rtol=0, atol=1e-12)


def naive_weights(old, roll, mask, level, mode, low, high):
    lo, hi = (-math.inf if low is None else low), (math.inf if high is None else high)

    def fix(r):
        if mode == "truncate":
            return min(max(r, lo), hi)
        return r if lo <= r <= hi else 0.0

    out = []
    for b in range(len(old)):
        ds = [0.0 if math.isnan(roll[b][t]) else old[b][t] - roll[b][t] for t in range(len(old[b])) if mask[b][t]]
        if level == "token":
            it = iter(ds)
            out.append([fix(math.exp(next(it))) if mask[b][t] else 1.0 for t in range(len(old[b]))])
        elif not ds:
            out.append(1.0)
        else:
            s = sum(ds) if level == "sequence" else sum(ds) / len(ds)
            out.append(fix(math.exp(s)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("bounds", [(None, 2.0), (0.5, 2.0), (0.8, None)])
def test_naive_equivalence(seed, level, mode, bounds):
    g = torch.Generator().manual_seed(seed)
    b, t = 7, 9
    roll = -torch.rand(b, t, generator=g, dtype=F64) * 3
    old = roll + 0.5 * torch.randn(b, t, generator=g, dtype=F64)
    roll[torch.rand(b, t, generator=g) < 0.1] = float("nan")  # tokens the engine could not score
    mask = (torch.arange(t)[None] < torch.randint(0, t + 1, (b,), generator=g)[:, None]).to(F64)
    corr = RolloutCorrection(level, mode, *bounds)
    w, m = corr.weights(old, roll, mask)
    ref = naive_weights(old.tolist(), roll.tolist(), mask.tolist(), level, mode, *bounds)
    torch.testing.assert_close(w, torch.tensor(ref, dtype=F64), rtol=1e-12, atol=1e-12)
    assert m["rollout/nan_tokens"] == float((torch.isnan(roll) & (mask > 0)).sum())
    assert not w.requires_grad


def test_from_trl_modes():
    assert RolloutCorrection.from_trl("token_truncate", None, 3.0) == RolloutCorrection("token", "truncate", None, 3.0)
    assert RolloutCorrection.from_trl("sequence_mask", 0.5, 3.0) == RolloutCorrection("sequence", "mask", 0.5, 3.0)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode='seq'; valid: token_truncate"):
        RolloutCorrection.from_trl("seq", None, 3.0)


def test_errors_name_the_input():
    with pytest.raises(ValueError, match="level='tok'; valid: token, sequence, geometric"):
        RolloutCorrection("tok")
    with pytest.raises(ValueError, match="needs a bound"):
        RolloutCorrection(high=None)
    with pytest.raises(ValueError, match=r"low \(2.0\) must be below high \(2.0\)"):
        RolloutCorrection(low=2.0, high=2.0)
    with pytest.raises(ValueError, match="high must be a finite number >= 0"):
        RolloutCorrection(high=float("inf"))
    old = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rollout_log_probs has shape \(2, 2\), expected \(2, 3\)"):
        rollout_weights(old, torch.zeros(2, 2), torch.ones(2, 3), RolloutCorrection())
    with pytest.raises(ValueError, match="rollout_log_probs must be log-probabilities"):
        rollout_weights(old, torch.full((2, 3), 0.5), torch.ones(2, 3), RolloutCorrection())
    with pytest.raises(ValueError, match="old_log_probs is NaN"):
        rollout_weights(torch.full((2, 3), float("nan")), old, torch.ones(2, 3), RolloutCorrection())


def test_infinite_ratio_is_truncated_or_masked():
    old = torch.zeros(1, 2, dtype=F64)
    roll = torch.tensor([[-math.inf, 0.0]], dtype=F64)  # the engine gave the token probability 0
    w, m = RolloutCorrection("token", "truncate", high=2.0).weights(old, roll, torch.ones(1, 2))
    assert w.tolist() == [[2.0, 1.0]] and m["rollout/ratio_max"] == math.inf
    w, _ = RolloutCorrection("sequence", "mask", high=2.0).weights(old, roll, torch.ones(1, 2))
    assert w.tolist() == [0.0]
