"""`rspo study` (resumable grid of subprocess runs) and `rspo report` on a tiny smoke grid."""

from __future__ import annotations

import json

import pytest

from rspo.config import ConfigError, build, save_config
from rspo.study import StudyConfig, run_study, summarize, write_report
from rspo.train_config import TrainConfig
from tests.test_trainer import tiny_cfg


def test_smoke_study_runs_skips_resumes_and_reports(tiny_policy, tmp_path):
    base = tmp_path / "base.yaml"
    save_config(tiny_cfg(tiny_policy, tmp_path / "unused", steps=2, eval_every=1, eval_problems=4,
                         checkpoint_every=1, log_grad_variance=True), base)  # fmt: skip
    cfg = build(StudyConfig, {"base_config": str(base), "out_dir": str(tmp_path / "study"), "seeds": [0, 1],
                              "parallel": 2, "arms": {"grpo": ["objective.name=grpo"], "rspo": ["objective.name=rspo"]},
                              "accuracy_levels": [0.0]})  # fmt: skip
    status = run_study(cfg, progress=False)
    assert sorted(status.values()) == ["done"] * 4, status
    for arm in ("grpo", "rspo"):
        rows = [json.loads(x) for x in (tmp_path / "study" / arm / "seed1" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2] and "grad/minibatch_var" in rows[-1]
        saved = build(TrainConfig, __import__("yaml").safe_load((tmp_path / "study" / arm / "seed1" / "config.yaml")
                                                                .read_text()))  # fmt: skip
        assert saved.seed == 1 and saved.objective.name == arm and saved.threads == 1
    # a second call skips finished runs; a run without done.json but with a checkpoint is resumed
    (tmp_path / "study" / "rspo" / "seed0" / "done.json").unlink()
    status = run_study(cfg, progress=False)
    assert status[str(tmp_path / "study" / "rspo" / "seed0")] == "done"
    assert sum(v == "done (skipped)" for v in status.values()) == 3
    table = summarize(cfg)
    assert set(table) == {"grpo", "rspo"} and table["rspo"]["seeds"] == 2
    report = write_report(tmp_path / "study", command="rspo study smoke.yaml")
    text = report.read_text()
    assert "| grpo |" in text and "| rspo |" in text and "Collapse rule" in text and "rspo study smoke.yaml" in text
    assert (tmp_path / "study" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "study" / "gamma.png").is_file()


def test_study_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="study.arms is empty"):
        build(StudyConfig, {})
    with pytest.raises(ConfigError, match="arm names"):
        build(StudyConfig, {"arms": {"a b": []}})
    with pytest.raises(FileNotFoundError, match="not a study directory"):
        write_report(tmp_path)
