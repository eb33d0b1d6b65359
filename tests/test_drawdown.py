"""The heavy-drift experiment's pre-registered analysis (rspo.lab.drawdown): hand-computed cases."""

from __future__ import annotations

import math

import pytest

from rspo.lab.drawdown import Design, analyse, drawdown, fisher_exact, mean_interval, verdict
from rspo.lab.metrics import BELOW_95_OFF, GAMMA_OFF


def rows(early: float, late: float, below95: float = 0.2, gamma: float = 0.96, val=(0.1, 0.2, 0.15, 0.15)):
    """40 logged steps: reward ``early`` up to step 20, ``late`` after; validation every 10 steps."""
    out = []
    for step in range(1, 41):
        r = {"step": step, "reward/mean": early if step <= 20 else late, BELOW_95_OFF: below95, GAMMA_OFF: gamma}
        if step % 10 == 0:
            r["val/accuracy"] = val[step // 10 - 1]
        out.append(r)
    return out


def test_drawdown_uses_the_fixed_windows():
    r = rows(0.2, 0.1)
    r.insert(0, {"step": 0, "val/accuracy": 0.06})  # the step-0 check has no reward: not in any window
    assert drawdown(r) == pytest.approx(0.1, abs=1e-12)
    # only steps 6-15 and 31-40 count: a spike at step 20 or a dip at step 25 changes nothing
    r[20]["reward/mean"], r[25]["reward/mean"] = 5.0, -5.0
    assert drawdown(r) == pytest.approx(0.1, abs=1e-12)
    assert math.isnan(drawdown(rows(0.2, 0.1)[:20]))  # the late window not reached


def test_mean_interval_hand_computed():
    m, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0], 0.95)
    half = 3.182446 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * s / sqrt(n), s^2 = 5/3
    assert m == 2.5 and lo == pytest.approx(2.5 - half, abs=1e-5) and hi == pytest.approx(2.5 + half, abs=1e-5)
    m, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0], 0.95, "lower")
    assert lo == pytest.approx(2.5 - 2.353363 * math.sqrt(5 / 3) / 2, abs=1e-5) and hi == math.inf
    assert math.isnan(mean_interval([1.0], 0.95)[1])


def test_fisher_exact_hand_computed():
    # margins 4/4 of 8: P(x) = C(4,x) C(4,4-x) / 70 = 1, 16, 36, 16, 1 (/70); a = 3 -> x in {0, 1, 3, 4}
    assert fisher_exact(3, 1, 1, 3) == pytest.approx(34 / 70, abs=1e-12)
    assert fisher_exact(0, 5, 5, 0) == pytest.approx(2 / 252, abs=1e-12)
    # 2 of 12 collapsed against 0 of 12: x in {0, 2}, each C(22,12)/C(24,12) = 646646/2704156
    assert fisher_exact(2, 10, 0, 12) == pytest.approx(2 * 646646 / 2704156, abs=1e-12)
    assert fisher_exact(0, 12, 0, 12) == 1.0


@pytest.mark.parametrize(
    ("delta", "g1", "g2", "expected"),
    [
        ([0.05, 0.06, 0.04, 0.05], True, True, "RSPO more stable"),
        ([0.05, 0.06, 0.04, 0.05], False, True, "untestable here"),
        ([0.05, 0.06, 0.04, 0.05], True, False, "untestable here"),
        ([0.001, -0.001, 0.002, -0.002], True, True, "not more stable"),
        ([0.03, -0.03, 0.05, -0.04], True, True, "inconclusive"),
        ([0.015, 0.016, 0.014, 0.015], True, True, "not more stable"),  # positive, tight, below the margin
    ],
)
def test_verdict_rules(delta, g1, g2, expected):
    assert verdict(delta, g1, g2, Design()) == expected


def test_analyse_end_to_end_on_synthetic_runs():
    collapse = (0.1, 0.2, 0.15, 0.05)  # final 0.05 < half the best 0.2
    arms = {
        "grpo": {
            s: rows(0.3, 0.3 - d, val=collapse if s < 2 else (0.1, 0.2, 0.15, 0.15))
            for s, d in enumerate([0.10, 0.08, 0.12, 0.10])
        },
        "rspo": {s: rows(0.3, 0.3 - d, gamma=0.95) for s, d in enumerate([0.02, 0.01, 0.03, 0.02])},
        "grpo_replay": {s: rows(0.3, 0.3 - d, below95=0.0) for s, d in enumerate([0.05, 0.04])},
        "gmpo": {s: rows(0.3, 0.3 - d) for s, d in enumerate([0.09, 0.07, 0.11, 0.09])},
    }
    res = analyse(arms)
    p = res["primary"]
    assert p["G1"] and p["G2"]
    assert p["delta"]["per_seed"] == pytest.approx({0: 0.08, 1: 0.07, 2: 0.09, 3: 0.08}, abs=1e-12)
    assert p["delta"]["mean"] == pytest.approx(0.08, abs=1e-12)
    assert p["verdict"] == "RSPO more stable"
    assert p["collapses"]["grpo"] == [2, 4] and p["collapses"]["rspo"] == [0, 4]
    assert p["collapses"]["fisher_p"] == pytest.approx(30 / 70, abs=1e-12)
    # replay halves GRPO's D on its seeds 0 and 1 (0.09 -> 0.045): drift explains the instability
    assert res["attribution"]["replay_cut"] == pytest.approx(0.5, abs=1e-12) and res["attribution"]["drift_explains"]
    assert res["rspo_vs_gmpo"]["D_diff"][0] == pytest.approx(0.07, abs=1e-12)
    assert res["lr_gamma_factor"] == pytest.approx(0.95, abs=1e-12)
    # the gates: too little drift in RSPO, or a GRPO that does not fall, make it untestable
    arms["rspo"] = {s: rows(0.3, 0.3 - d, below95=0.1) for s, d in enumerate([0.02, 0.01, 0.03, 0.02])}
    assert analyse(arms)["primary"]["verdict"] == "untestable here"


def test_pilot_rule():
    assert analyse({"grpo": {0: rows(0.3, 0.25), 1: rows(0.3, 0.24)}})["pilot_rule_met"]  # mean D 0.055
    assert not analyse({"grpo": {0: rows(0.3, 0.28), 1: rows(0.3, 0.27)}})["pilot_rule_met"]
