"""`rspo drift` (the drift atlas) end to end on a tiny grid, and its run summary on hand-made rows."""

from __future__ import annotations

import json
import math

import pytest

from rspo.config import build
from rspo.lab.drift import DriftConfig, run_drift, write_drift_report
from rspo.lab.metrics import drift_summary
from rspo.routing import GAMMA_EDGES


def test_summarize_run_pools_histograms():
    h1 = [5] + [0] * (len(GAMMA_EDGES) - 1)
    h2 = [0] * len(GAMMA_EDGES)
    h2[GAMMA_EDGES.index(0.9)] = 3  # three tokens in [0.9, 0.92)
    h2[GAMMA_EDGES.index(0.5)] = 2  # two in [0.5, 0.6)
    rows = [
        {
            "step": 1,
            "offpolicy/gamma_hist": h1,
            "offpolicy/router_gamma_mean": 1.0,
            "offpolicy/router_non_shifted_ratio": 1.0,
            "offpolicy/router_keep_layer0": 1.0,
            "offpolicy/router_shift_layer0": 0.0,
        },
        {
            "step": 2,
            "offpolicy/gamma_hist": h2,
            "offpolicy/router_gamma_mean": 0.8,
            "offpolicy/router_non_shifted_ratio": 0.5,
            "offpolicy/router_keep_layer0": 0.5,
            "offpolicy/router_shift_layer0": 0.2,
        },
    ]
    s = drift_summary(rows)
    assert s["tokens"] == 10 and s["below_0.95"] == pytest.approx(0.5) and s["below_0.9"] == pytest.approx(0.2)
    assert s["keep_all"] == pytest.approx(0.75) and s["keep_layer"] == [0.75] and s["shift_layer"] == [0.1]
    assert s["gamma_mean"] == pytest.approx(0.9) and s["p50"] == pytest.approx(0.92, abs=1e-12)


def test_tiny_atlas_runs_and_reports(tmp_path):
    cfg = build(
        DriftConfig,
        {
            "out_dir": str(tmp_path / "atlas"),
            "parallel": 2,
            "entropy_problems": 8,
            "pretrain": ["steps=20", "batch_size=16", "eval_every=0", "final_eval=false", "shuffle_buffer=32"],
            "models": {"a": ["preset=tiny-qwen3-moe"], "b": ["preset=tiny-olmoe", "router_aux_loss_coef=0.01"]},
            "base_config": "configs/demo.yaml",
            "common": [
                "steps=2",
                "eval_every=0",
                "checkpoint_every=2",
                "rollout.prompts_per_step=4",
                "rollout.group_size=4",
                "rollout.max_new_tokens=12",
            ],
            "regimes": {"u2": ["mini_batch_size=8"], "u4": ["mini_batch_size=4"]},
        },
    )
    status = run_drift(cfg, progress=False)
    assert sorted(status.values()) == ["done"] * 6, status
    assert run_drift(cfg, progress=False) and all(
        v == "done (skipped)" for v in run_drift(cfg, progress=False).values()
    )
    report = write_drift_report(tmp_path / "atlas", out=tmp_path / "docs")
    text = report.read_text()
    assert "| a | u2 |" in text and "| b | u4 |" in text and "router entropy" in text
    res = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert res["models"]["b"]["aux"] == 0.01 and 0 < res["models"]["a"]["entropy_norm"] <= 1
    four = res["runs"]["a/u4"]
    assert four["tokens"] > 0 and 0 <= four["below_0.95"] <= 1 and len(four["keep_layer"]) == 2
    assert res["runs"]["a/u2"]["tokens"] < four["tokens"]  # 1 off-policy update of 2 vs 3 of 4
    for f in ("gamma_cdf.png", "tail.png", "per_layer.png", "entropy.png"):
        assert (tmp_path / "docs" / f).read_bytes()[:4] == b"\x89PNG"


def test_gradient_variance_is_paired_and_exact_for_gmpo_vs_rspo_at_gamma_one(tiny_policy, tmp_path):
    """At theta_1 after a warm step the batch is off-policy; the variances are finite and positive, GMPO's and
    RSPO's differ only through gamma; with no warm step (on-policy, gamma = 1) they are identical."""
    from rspo.config import save_config
    from rspo.lab.gradvar import GradVarConfig, measure, write_gradvar
    from tests.test_trainer import tiny_cfg

    base = tmp_path / "base.yaml"
    save_config(tiny_cfg(tiny_policy, tmp_path / "unused"), base)
    common = {"train_config": str(base), "draws": 4, "seeds": [0, 1]}
    cfg = build(GradVarConfig, {**common, "out_dir": str(tmp_path / "gv")})
    res = measure(cfg, progress=False)
    for name in ("grpo", "gmpo", "rspo"):
        v = res["summary"][name]
        assert v["variance"][0] > 0 and math.isfinite(v["relative_variance"][0])
    ratios = res["summary"]["rspo_over_gmpo_variance"]["per_seed"]
    assert all(r != 1.0 and 0.5 < r < 2 for r in ratios)  # gamma < 1 off-policy: different, same scale
    assert "| rspo |" in write_gradvar(cfg, res).read_text()
    on = measure(build(GradVarConfig, {**common, "warm_updates": 0, "out_dir": str(tmp_path / "gv0")}), progress=False)
    assert on["summary"]["rspo_over_gmpo_variance"]["per_seed"] == [1.0, 1.0]  # gamma exactly 1: the same gradients
