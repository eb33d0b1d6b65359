"""`rspo study` (resumable grid of subprocess runs) and `rspo report` on a tiny smoke grid."""

from __future__ import annotations

import json
import math

import pytest

from rspo.config import ConfigError, build, save_config
from rspo.errors import RunDirError
from rspo.lab.report import summarize, write_report
from rspo.lab.study import StudyConfig, run_study
from rspo.train_config import TrainConfig
from tests.test_trainer import metrics, tiny_cfg


def test_smoke_study_runs_skips_resumes_and_reports(tiny_policy, tmp_path):
    base = tmp_path / "base.yaml"
    save_config(
        tiny_cfg(
            tiny_policy,
            tmp_path / "unused",
            steps=2,
            eval_every=1,
            eval_problems=4,
            eval_samples=2,
            checkpoint_every=1,
            log_grad_variance=True,
        ),
        base,
    )
    cfg = build(
        StudyConfig,
        {
            "base_config": str(base),
            "out_dir": str(tmp_path / "study"),
            "seeds": [0, 1],
            "parallel": 2,
            "arms": {"grpo": ["objective.name=grpo"], "rspo": ["objective.name=rspo"]},
            "accuracy_levels": [0.0],
        },
    )
    status = run_study(cfg, progress=False)
    assert sorted(status.values()) == ["done"] * 4, status
    for arm in ("grpo", "rspo"):
        rows = metrics(tmp_path / "study" / arm / "seed1")
        assert [r["step"] for r in rows] == [0, 1, 2] and "grad/minibatch_var" in rows[-1]
        # sampled validation: 2 responses for each of the 4 problems, so pass@1 is a multiple of 1/8
        assert all(round(r["val/accuracy_sampled"] * 8, 9).is_integer() for r in rows)
        saved = build(
            TrainConfig, __import__("yaml").safe_load((tmp_path / "study" / arm / "seed1" / "config.yaml").read_text())
        )
        assert saved.seed == 1 and saved.objective.name == arm and saved.threads == 1
    # a second call skips finished runs; a run without done.json but with a checkpoint is resumed
    (tmp_path / "study" / "rspo" / "seed0" / "done.json").unlink()
    status = run_study(cfg, progress=False)
    assert status[str(tmp_path / "study" / "rspo" / "seed0")] == "done"
    assert sum(v == "done (skipped)" for v in status.values()) == 3
    table = summarize(cfg)
    assert set(table) == {"grpo", "rspo"} and table["rspo"]["seeds"] == 2
    last = [metrics(tmp_path / "study" / "rspo" / f"seed{s}")[-1] for s in (0, 1)]
    assert table["rspo"]["final_per_seed"][1] == last[1]["val/accuracy"]
    assert table["rspo"]["sampled"][0] == pytest.approx(
        (last[0]["val/accuracy_sampled"] + last[1]["val/accuracy_sampled"]) / 2, abs=1e-12
    )
    report = write_report(tmp_path / "study", command="rspo study smoke.yaml")
    text = report.read_text()
    assert "| grpo |" in text and "| rspo |" in text and "Collapse rule" in text and "rspo study smoke.yaml" in text
    assert (tmp_path / "study" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "study" / "gamma.png").is_file() and (tmp_path / "study" / "final.png").is_file()
    # results.json: every seed's checks and per-step traces, as logged
    res = json.loads((tmp_path / "study" / "results.json").read_text())
    for arm in ("grpo", "rspo"):
        for seed in (0, 1):
            rows = metrics(tmp_path / "study" / arm / f"seed{seed}")
            run = res["arms"][arm]["runs"][str(seed)]
            assert run["checks"] == [
                {"step": r["step"], "accuracy": r["val/accuracy"], "accuracy_sampled": r["val/accuracy_sampled"]}
                for r in rows
            ]
            assert run["traces"]["reward/mean"] == [[r["step"], r["reward/mean"]] for r in rows if "reward/mean" in r]
            assert run["summary"]["final"] == rows[-1]["val/accuracy"]
    assert res["arms"]["rspo"]["overrides"] == ["objective.name=rspo"]
    # the heavy-drift analysis on the same study: 2 steps never reach its windows, so D is undefined and the
    # verdict is "untestable here", said as such (not a null result)
    from rspo.lab.drawdown import write_drawdown_report

    text = write_drawdown_report(tmp_path / "study", command="rspo study smoke.yaml").read_text()
    assert "| grpo | 2 | n/a" in text and "**Verdict: untestable here.**" in text
    dd = json.loads((tmp_path / "study" / "drawdown" / "results.json").read_text())
    assert dd["analysis"]["primary"]["G2"] is False and dd["data"]["arms"].keys() == {"grpo", "rspo"}
    # a report elsewhere (as docs/study/): new directory, then only with --overwrite, never a foreign one
    rep = tmp_path / "docs" / "rep"
    write_report(tmp_path / "study", out=rep)
    with pytest.raises(RunDirError, match="already holds a report run"):
        write_report(tmp_path / "study", out=rep)
    (rep / "README.md").write_text("hand-written")
    write_report(tmp_path / "study", out=rep, overwrite=True)
    assert (rep / "README.md").read_text() == "hand-written" and (rep / "report.md").is_file()
    with pytest.raises(RunDirError, match="not created by rspo"):
        write_report(tmp_path / "study", out=tmp_path / "docs", overwrite=True)

    # a second study (one arm) whose report shows the first study's arms as references
    ref = build(
        StudyConfig,
        {
            "base_config": str(base),
            "out_dir": str(tmp_path / "abl"),
            "seeds": [0],
            "arms": {"gmpo": ["objective.name=gmpo", "router_shift.enabled=false"]},
            "accuracy_levels": [0.0],
            "reference_dir": str(tmp_path / "study"),
            "reference_arms": ["grpo"],
        },
    )
    assert run_study(ref, progress=False) == {str(tmp_path / "abl" / "gmpo" / "seed0"): "done"}
    table = summarize(ref)
    assert list(table) == ["gmpo", "grpo (ref)"] and table["grpo (ref)"]["seeds"] == 2
    text = write_report(tmp_path / "abl").read_text()
    assert "| grpo (ref) | `objective.name=grpo` | 2 |" in text and "runs of `" in text
    # references must come from a study with the same base config and common overrides, and name its arms
    with pytest.raises(ValueError, match="reference_arms.*'nope'"):
        summarize(build(StudyConfig, {**ref.__dict__, "reference_arms": ["nope"]}))
    with pytest.raises(ValueError, match="not comparable"):
        summarize(build(StudyConfig, {**ref.__dict__, "common": ["steps=3"]}))


def test_study_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="study.arms is empty"):
        build(StudyConfig, {})
    with pytest.raises(ConfigError, match="arm names"):
        build(StudyConfig, {"arms": {"a b": []}})
    with pytest.raises(FileNotFoundError, match="not a study directory"):
        write_report(tmp_path)
    with pytest.raises(ConfigError, match="reference_dir and study.reference_arms go together"):
        build(StudyConfig, {"arms": {"a": []}, "reference_dir": "runs/x"})
    with pytest.raises(ConfigError, match="study.order must be 'arm' or 'seed'"):
        build(StudyConfig, {"arms": {"a": []}, "order": "random"})


def test_run_order_arm_major_or_interleaved_by_seed():
    from rspo.lab.study import run_dirs

    arms = {"grpo": [], "rspo": []}
    cfg = build(StudyConfig, {"arms": arms, "seeds": [0, 1], "out_dir": "s"})
    assert [(a, s) for a, s, _ in run_dirs(cfg)] == [("grpo", 0), ("grpo", 1), ("rspo", 0), ("rspo", 1)]
    cfg = build(StudyConfig, {"arms": arms, "seeds": [0, 1], "out_dir": "s", "order": "seed"})
    assert [(a, s, str(r)) for a, s, r in run_dirs(cfg)][:2] == [
        ("grpo", 0, "s/grpo/seed0"),
        ("rspo", 0, "s/rspo/seed0"),
    ]


def test_summarize_hand_computed_rows():
    """final / last-3-checks mean / best / collapse / steps-to-reach / update averages on hand-made rows."""
    from rspo.lab.report import ArmRuns

    def rows(vals, clip):
        out = [{"step": 0, "val/accuracy": vals[0]}]
        for i, v in enumerate(vals[1:], start=1):
            out.append({"step": i, "clip_ratio/region_mean": clip * i, "val/accuracy": v})
        return out

    cfg = build(StudyConfig, {"arms": {"a": []}, "accuracy_levels": [0.3]})
    arms = {"a": ArmRuns([], {0: rows([0.2, 0.3, 0.1, 0.5, 0.2], 0.1), 1: rows([0.2, 0.25, 0.2, 0.2, 0.05], 0.3)})}
    t = summarize(cfg, arms)["a"]
    assert t["final_per_seed"] == [0.2, 0.05] and t["best_per_seed"] == [0.5, 0.25]
    assert t["final"][0] == pytest.approx(0.125, abs=1e-12)
    assert t["late"][0] == pytest.approx(((0.1 + 0.5 + 0.2) / 3 + (0.2 + 0.2 + 0.05) / 3) / 2, abs=1e-12)
    assert t["collapsed"] == 2  # 0.2 < 0.5 * 0.5 and 0.05 < 0.5 * 0.25
    assert t["reach"][0.3] == [1, None]
    assert t["clip"][0] == pytest.approx((0.25 + 0.75) / 2, abs=1e-12)  # mean over steps 1..4, then over seeds
    assert math.isnan(t["sampled"][0])  # no sampled checks logged


def test_t_quantile_and_mean_ci_against_tables():
    from rspo.lab.stats import mean_ci, t_quantile

    # Student's t, 97.5% quantiles (standard tables, 8 digits)
    for df, want in [(1, 12.7062047), (2, 4.30265273), (4, 2.77644511), (9, 2.26215716), (30, 2.04227246)]:
        assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-6)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)
    xs = [0.1, 0.2, 0.4]  # mean 0.7/3, sample std sqrt(0.02333..)
    m, h = mean_ci(xs)
    assert m == pytest.approx(0.7 / 3, abs=1e-12)
    assert h == pytest.approx(
        4.30265273 * math.sqrt(((0.1 - m) ** 2 + (0.2 - m) ** 2 + (0.4 - m) ** 2) / 2 / 3), abs=1e-7
    )
    assert math.isnan(mean_ci([0.3])[1]) and math.isnan(mean_ci([])[0])
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0.975, 0)


def test_paired_differences_hand_computed():
    from rspo.lab.stats import paired_differences

    table = {"a": {0: 0.30, 1: 0.20, 2: 0.25}, "b": {0: 0.20, 1: 0.20, 2: 0.15, 3: 0.9}}
    (d,) = paired_differences(table, ["a - b"])
    assert (d["arm"], d["baseline"], d["seeds"]) == ("a", "b", 3)  # seed 3 has no pair
    assert d["diff"] == pytest.approx(0.2 / 3, abs=1e-12)
    diffs = [0.1, 0.0, 0.1]
    sd = math.sqrt(sum((x - 0.2 / 3) ** 2 for x in diffs) / 2)
    assert d["half"] == pytest.approx(4.30265273 * sd / math.sqrt(3), abs=1e-7)
    assert [(x["arm"], x["baseline"]) for x in paired_differences(table, [])] == [("b", "a")]
    with pytest.raises(ValueError, match=r"no runs for \['c'\]"):
        paired_differences(table, ["c - a"])
    with pytest.raises(ValueError, match="is not 'arm - baseline'"):
        build(StudyConfig, {"arms": {"a": []}, "compare": ["a-b"]})


def test_progress_of_a_resumed_run_never_goes_back():
    """A resumed run first drops the steps logged after its last checkpoint (counted as done when the study
    started), then logs them again: the bar advances only past the most ever seen (no negative rate)."""
    from rspo.lab.jobs import advance

    seen = {"run": 20}  # 20 steps logged before the interruption, checkpoint at 10
    assert [advance(seen, "run", n) for n in (10, 15, 20, 21, 25)] == [0, 0, 0, 1, 4]
    assert seen == {"run": 25}
