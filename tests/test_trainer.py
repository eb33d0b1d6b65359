"""The RL trainer end to end on a tiny real-architecture MoE: every objective and routing control,
on-policy exactness, resume after a kill, non-finite losses, failing rewards, collapse, config errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rspo.config import ConfigError, build, load_config
from rspo.errors import CheckpointError, ModelError, RunDirError
from rspo.logprobs import response_log_probs
from rspo.routing import histogram_share_below
from rspo.train_config import TrainConfig
from rspo.trainer import Trainer, TrainingError

TIMING = ("time/", "perf/")


def tiny_cfg(policy: str, out: Path, **over) -> TrainConfig:
    data = {
        "model": policy,
        "out_dir": str(out),
        "steps": 2,
        "mini_batch_size": 8,
        "eval_every": 0,
        "threads": 1,
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 14},
        "optim": {"lr": 3e-3},
    }
    for k, v in over.items():
        node = data
        parts = k.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return build(TrainConfig, data)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


VARIANTS = {
    "grpo": {"objective__name": "grpo"},
    "dapo_clip_higher": {"objective__name": "grpo", "objective__clip_high": 0.28},
    "dr_grpo": {"objective__name": "grpo", "objective__loss_agg": "seq-mean-token-sum-norm", "advantage": "dr_grpo"},
    "gspo": {"objective__name": "gspo", "objective__clip_low": 0.05, "objective__clip_high": 0.05},
    "gspo_token": {"objective__name": "gspo_token"},
    "gmpo": {"objective__name": "gmpo"},
    "rspo": {"objective__name": "rspo"},
    "rspo_before_clip": {"objective__name": "rspo", "router_shift__placement": "before_clip"},
    "rspo_mean_exp_product": {
        "objective__name": "rspo",
        "router_shift__expert_agg": "mean_exp",
        "router_shift__layer_agg": "product",
        "router_shift__gamma_min": 0.2,
    },
    "rspo_no_stop_gradient": {"objective__name": "rspo", "router_shift__stop_gradient": False},
    "rspo_router_clip_drop": {
        "objective__name": "rspo",
        "router_shift__clip_threshold": 0.99,
        "router_shift__clip_drop": True,
    },
    "grpo_rs": {"objective__name": "grpo", "router_shift__enabled": True},
    "gspo_rs": {"objective__name": "gspo", "router_shift__enabled": True, "objective__clip_low": 0.05},
    "freeze": {"objective__name": "grpo", "routing__control": "freeze"},
    "replay_logits": {"objective__name": "grpo", "routing__control": "replay_logits"},
    "replay_indices": {"objective__name": "grpo", "routing__control": "replay_indices"},
    "grpo_dual_clip_token_tis": {
        "objective__name": "grpo",
        "objective__dual_clip": 3.0,
        "rollout_correction__level": "token",
    },
    "rspo_icepop_tempered": {
        "objective__name": "rspo",
        "rollout__temperature": 0.7,
        "rollout__top_p": 0.9,
        "rollout_correction__level": "token",
        "rollout_correction__mode": "mask",
        "rollout_correction__low": 0.5,
        "rollout_correction__reduce": "arithmetic",
    },
    "gspo_sequence_mask": {
        "objective__name": "gspo",
        "rollout_correction__level": "sequence",
        "rollout_correction__mode": "mask",
        "rollout_correction__low": 0.5,
    },
    "kl_aux_drop_epochs": {
        "objective__name": "rspo",
        "kl_coef": 0.05,
        "routing__aux_loss_coef": 0.01,
        "drop_zero_spread": True,
        "ppo_epochs": 2,
    },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_objective_and_control_trains(tiny_policy, tmp_path, variant):
    cfg = tiny_cfg(tiny_policy, tmp_path / variant, **VARIANTS[variant])
    tr = Trainer(cfg, progress=False)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    changed = [n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no parameter changed"
    gate = [n for n in before if n.endswith("mlp.gate.weight")]
    if variant in ("freeze", "replay_logits"):
        assert not set(gate) & set(changed)  # the router got no update
    else:
        assert set(gate) & set(changed)
    rows = metrics(tmp_path / variant)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        hist = r.pop("offpolicy/gamma_hist")  # token counts per gamma bin, summed over the off-policy updates
        assert all(isinstance(c, int) and c >= 0 for c in hist) and sum(hist) > 0
        for thr in (0.99, 0.95, 0.9):  # with one off-policy update, the histogram gives its exact shares
            share = r[f"offpolicy/router_gamma_below_{thr}"]
            if tr.cfg.updates_per_step == 2:
                assert histogram_share_below(hist, thr) == pytest.approx(share, abs=1e-12)
        for k, v in r.items():
            assert isinstance(v, (int, float)) and math.isfinite(v), (k, v)
        assert 0 < r["router/gamma_mean"] <= 1 and 0 <= r["router/non_shifted_ratio"] <= 1
        assert r["train/nonfinite_loss"] == 0
        layers = [k for k in r if k.startswith("offpolicy/router_keep_layer")]
        assert len(layers) == 2  # the tiny model's two MoE layers (layer 1 is dense)
        assert r["offpolicy/router_non_shifted_ratio"] <= min(r[k] for k in layers) + 1e-12
    assert (tmp_path / variant / "checkpoint" / "model.safetensors").is_file()
    assert (tmp_path / variant / "config.yaml").is_file()


def test_first_minibatch_is_exactly_on_policy(tiny_policy, tmp_path):
    tr = Trainer(tiny_cfg(tiny_policy, tmp_path / "r", objective__name="rspo"), progress=False)
    b = tr.rollout()
    tr.score_and_advantages(b)
    tr.old_pass(b)
    mb = b.order[: tr.cfg.mini_batch_size]
    with tr.routing.forward(b.old[mb], b.resp) as cur:
        logp, _, _ = response_log_probs(tr.model, b.sequences[mb], b.attention_mask[mb], b.response_len)
    tr.routing.end()
    assert torch.equal(logp, b.old_log_probs[mb])  # ratio exactly 1
    assert torch.equal(cur.trace.logp, b.old[mb].trace.logp)  # gamma exactly 1
    stats = tr.update(b)  # two updates: the second is off-policy
    assert stats["offpolicy/router_gamma_mean"] < 1.0
    assert stats["offpolicy/ratio_std"] > 0


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampler_log_probs_reach_the_loss(tiny_policy, tmp_path, temperature, top_p):
    """The sampler's log-probs and the old pass agree (same model: ratio 1 up to float32 numerics) at the
    rollout temperature, and the correction's weights reach the loss: masking every token (no ratio lies in
    [1.5, 2]) leaves the policy unchanged."""
    over = {"rollout__temperature": temperature, "rollout__top_p": top_p, "steps": 1}
    tr = Trainer(tiny_cfg(tiny_policy, tmp_path / "a", **over), progress=False)
    b = tr.rollout()
    tr.score_and_advantages(b)
    tr.old_pass(b)
    keep = b.response_mask > 0
    assert b.rollout_log_probs is not None and b.rollout_weights is None  # diagnostics only by default
    assert (b.rollout_log_probs - b.old_log_probs)[keep].abs().max() < 2e-5
    assert b.rollout_stats["rollout/logp_diff_max"] < 2e-5 and abs(b.rollout_stats["rollout/ratio_mean"] - 1) < 1e-5
    assert "rollout/weight_mean" not in b.rollout_stats
    over |= {
        "rollout_correction__level": "token",
        "rollout_correction__mode": "mask",
        "rollout_correction__low": 1.5,
        "rollout_correction__high": 2.0,
        "objective__name": "grpo",
    }
    tr = Trainer(tiny_cfg(tiny_policy, tmp_path / "b", **over), progress=False)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    row = metrics(tmp_path / "b")[-1]
    assert row["rollout/masked_frac"] == 1.0 and row["rollout/weight_zero_frac"] == 1.0
    assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters())  # every weight 0: no step


def test_resume_after_kill_matches_uninterrupted(tiny_policy, tmp_path):
    over = {"steps": 5, "checkpoint_every": 2, "eval_every": 2, "eval_problems": 8, "objective__name": "rspo"}
    straight = tmp_path / "straight"
    Trainer(tiny_cfg(tiny_policy, straight, **over), progress=False).train()

    run = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.yaml"
    from rspo.config import save_config

    save_config(tiny_cfg(tiny_policy, run, **over), cfg_file)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rspo.cli", "train", str(cfg_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once step 3 is logged (the checkpoint is at step 2)
        if (run / "metrics.jsonl").exists() and any(r["step"] >= 3 for r in metrics(run)):
            break
        if proc.poll() is not None:
            pytest.fail("the training subprocess ended before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] in (2, 4)
    assert max(r["step"] for r in metrics(run)) < 5
    r = subprocess.run(
        [sys.executable, "-m", "rspo.cli", "train", "--resume", str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = metrics(straight), metrics(run)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [0, 1, 2, 3, 4, 5]
    for x, y in zip(a, b, strict=True):
        strip = lambda d: {k: v for k, v in d.items() if not k.startswith(TIMING)}  # noqa: E731
        assert strip(x) == strip(y)


def test_nonfinite_loss_skips_then_stops(tiny_policy, tmp_path, monkeypatch):
    import rspo.trainer as trainer_mod

    run = tmp_path / "nan"
    tr = Trainer(tiny_cfg(tiny_policy, run, steps=4, checkpoint_every=1, max_bad_steps=3), progress=False)
    real = trainer_mod.compute_policy_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss, m = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] >= 3 else loss), m  # from the 2nd step's first update on

    monkeypatch.setattr(trainer_mod, "compute_policy_loss", flaky)
    good = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    with pytest.raises(TrainingError, match=r"3 non-finite losses in a row .* last good checkpoint .* \(step 2\)"):
        tr.train()
    rows = metrics(run)
    assert rows[0]["train/nonfinite_loss"] == 0 and rows[-1]["step"] == 2 and rows[-1]["train/nonfinite_loss"] == 2
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2  # step 2 (both updates skipped) still checkpointed, parameters unchanged by it
    del good


def test_reward_function_that_raises_is_counted(tiny_policy, tmp_path):
    tr = Trainer(tiny_cfg(tiny_policy, tmp_path / "rw", steps=1), progress=False)
    from tests.helpers import FlakyTask

    tr.task = FlakyTask(tr.task)
    tr.train()
    row = metrics(tmp_path / "rw")[-1]
    assert row["reward/errors"] == 16 // 3


def test_collapse_is_detected_and_reported(tiny_policy, tmp_path, monkeypatch, capsys):
    import rspo.trainer as trainer_mod

    accs = iter([0.30, 0.32, 0.10])

    class R:
        def __init__(self, a):
            self.accuracy = a

    monkeypatch.setattr(trainer_mod, "evaluate", lambda *a, **k: R(next(accs)))
    run = tmp_path / "col"
    summary = Trainer(tiny_cfg(tiny_policy, run, steps=2, eval_every=1), progress=False).train()
    rows = metrics(run)
    assert [r["val/collapsed"] for r in rows] == [0.0, 0.0, 1.0]
    assert summary["collapse_step"] == 2 and summary["best_val"] == 0.32
    assert "COLLAPSE at step 2" in capsys.readouterr().out


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="routing.control='replay'.*'none', 'freeze', 'replay_logits'"):
        build(TrainConfig, {"routing": {"control": "replay"}})
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['rollout.groupsize'\]"):
        build(TrainConfig, {"rollout": {"groupsize": 4}})
    with pytest.raises(ConfigError, match="objective.name: 'ppo' is not an objective; valid: grpo"):
        build(TrainConfig, {"objective": {"name": "ppo"}})
    with pytest.raises(ConfigError, match="mini_batch_size=48 must divide the rollout batch"):
        build(TrainConfig, {"mini_batch_size": 48})
    with pytest.raises(ConfigError, match="'gmpo' cannot use router shift"):
        build(TrainConfig, {"objective": {"name": "gmpo"}, "router_shift": {"enabled": True}})
    with pytest.raises(ConfigError, match="steps must be an integer"):
        build(TrainConfig, {"steps": "many"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="rollout_correction: high set but level is none"):
        build(TrainConfig, {"rollout_correction": {"high": 3.0}})
    with pytest.raises(ConfigError, match="rollout_correction.reduce applies to level=token with a sequence"):
        rc = {"level": "token", "reduce": "arithmetic"}
        build(TrainConfig, {"objective": {"name": "grpo"}, "rollout_correction": rc})
    with pytest.raises(ConfigError, match=r"objective.dual_clip must be a number > 1 \+ objective.clip_high"):
        build(TrainConfig, {"objective": {"name": "grpo", "dual_clip": 1.1}})
    with pytest.raises(ConfigError, match="dual_clip"):
        build(TrainConfig, {"objective": {"name": "rspo", "dual_clip": 3.0}})
    with pytest.raises(ConfigError, match=r"router_shift.placement set but router shift is off for 'grpo'"):
        build(TrainConfig, {"objective": {"name": "grpo"}, "router_shift": {"placement": "before_clip"}})
    with pytest.raises(ConfigError, match=r"router_shift.gamma_min: must be in \(0, 1\], got 1.5"):
        build(TrainConfig, {"router_shift": {"gamma_min": 1.5}})
    cfg = load_config(TrainConfig, None, ["objective.name=gspo", "seed=3", "optim.lr=1e-3", "router_shift.top_k=null"])
    assert (cfg.objective.name, cfg.seed, cfg.optim.lr, cfg.router_shift.enabled) == ("gspo", 3, 1e-3, False)


def test_presets_load(tmp_path):
    """Every train preset loads and is in the paper's off-policy regime; the 30B preset with its data files
    pointed at the shipped ones (it names the user's files, which are not here)."""
    shipped = [
        "task.options.train=[builtin:math/arith-train.jsonl]",
        "task.options.eval={aime24: builtin:math/sample-plain.jsonl}",
    ]
    configs = Path(__file__).resolve().parents[1] / "configs"
    for f in sorted(configs.glob("*.yaml")):
        if f.name.startswith(("study", "pretrain", "drift", "gradvar")):  # other commands' configs (below)
            continue
        cfg = load_config(TrainConfig, f, shipped if "30b" in f.name else [])
        assert cfg.updates_per_step >= 2, f.name  # the paper's off-policy regime
    big = load_config(TrainConfig, configs / "math-qwen3-30b-a3b.yaml", shipped)
    assert (big.rollout.prompts_per_step, big.rollout.group_size, big.mini_batch_size) == (128, 8, 512)
    assert (big.max_new_tokens, big.dtype, big.device) == (8192, "bfloat16", "cuda")
    with pytest.raises(ConfigError, match="data file 'data/deepscaler/train.parquet' does not exist"):
        load_config(TrainConfig, configs / "math-qwen3-30b-a3b.yaml")
    from rspo.lab.pretrain import PretrainConfig

    pre = load_config(PretrainConfig, configs / "pretrain-math-tiny.yaml")
    assert (pre.task.name, pre.tokenizer) == ("arithmetic", "bpe")
    from rspo.lab.drift import DriftConfig

    atlas = load_config(DriftConfig, configs / "drift-atlas.yaml")
    assert len(atlas.models) == 8 and len(atlas.regimes) == 4
    from rspo.lab.gradvar import GradVarConfig
    from rspo.lab.study import StudyConfig

    for f in sorted(configs.glob("gradvar-*.yaml")):
        gv = load_config(GradVarConfig, f)
        assert load_config(TrainConfig, gv.train_config, gv.overrides).updates_per_step >= 2, f.name
    for f in sorted(configs.glob("study-*.yaml")):  # every arm of every study is a valid train config
        st = load_config(StudyConfig, f)
        for arm, over in st.arms.items():
            if "optim.lr=LR_GAMMA" in over:  # filled in from phase 1's result (docs/study/heavy-drift/DESIGN.md)
                with pytest.raises(ConfigError, match="optim.lr must be a number, got 'LR_GAMMA'"):
                    load_config(TrainConfig, st.base_config, [*st.common, *over])
                over = [o.replace("LR_GAMMA", "3.9e-4") for o in over]
            run = load_config(TrainConfig, st.base_config, [*st.common, *over])
            assert run.updates_per_step >= 2, (f.name, arm)


def test_corrupt_checkpoint_and_missing_policy(tiny_policy, tmp_path):
    run = tmp_path / "c"
    Trainer(tiny_cfg(tiny_policy, run, steps=1), progress=False).train()
    (run / "checkpoint" / "trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint .* is corrupt: trainer.pt is 16 bytes, its manifest says"):
        Trainer(tiny_cfg(tiny_policy, run, steps=2), resume=True, progress=False)
    with pytest.raises(ModelError, match="does not exist"):
        Trainer(tiny_cfg(str(tmp_path / "missing"), tmp_path / "m"), progress=False)
    assert not (tmp_path / "m").exists()  # nothing written for a run that cannot start
    with pytest.raises(RunDirError, match="already holds a train run"):
        Trainer(tiny_cfg(tiny_policy, run, steps=1), progress=False)


def test_plot_writes_png(tiny_policy, tmp_path):
    from rspo.cli import main

    run = tmp_path / "p"
    Trainer(tiny_cfg(tiny_policy, run, steps=2, eval_every=1, eval_problems=4), progress=False).train()
    assert main(["plot", str(run), str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
