"""Pretraining (loss falls, checkpoint loads), `rspo eval`, the shipped base policy, the demo."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rspo.assets import policy_dir
from rspo.cli import main
from rspo.lab.pretrain import PretrainConfig, collate, lr_at, pretrain
from rspo.lab.tokenizer import build_char_tokenizer
from rspo.policy import load_policy

BASE_POLICY_DIR, E8K1_BASE_DIR = policy_dir("countdown-e64k8"), policy_dir("countdown-base")


def test_pretraining_loss_falls_and_checkpoint_loads(tmp_path):
    out = tmp_path / "pt"
    pretrain(
        PretrainConfig(
            preset="tiny-qwen3-moe",
            out_dir=str(out),
            steps=60,
            batch_size=32,
            lr=3e-3,
            warmup_steps=5,
            eval_every=30,
            eval_problems=16,
            final_eval=False,
            shuffle_buffer=64,
            threads=1,
        ),
        progress=False,
    )
    info = json.loads((out / "pretrain.json").read_text())
    losses = [h["loss"] for h in info["history"]]
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10  # 3.0 -> 1.9 measured
    assert "val_greedy_acc" in info["history"][29]
    assert (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and tok.eos_token_id == 1


def test_collate_masks_the_prompt():
    tok = build_char_tokenizer()
    batch = collate(tok, [("1 2 -> 3\n", "<answer>1+2</answer>"), ("4 -> 4\n", "<answer>4</answer>")])
    lab, ids = batch["labels"], batch["input_ids"]
    assert (lab[0, :9] == -100).all() and lab[0, 9] == tok.convert_tokens_to_ids("<answer>")
    assert lab[0, 14] == tok.eos_token_id and ids.shape == lab.shape
    assert (lab[1][batch["attention_mask"][1] == 0] == -100).all()
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1.0)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize(("path", "lo"), [(BASE_POLICY_DIR, 0.03), (E8K1_BASE_DIR, 0.30)])
def test_shipped_base_policies_load_in_fp32(path, lo):
    model = load_policy(path).model
    assert next(model.parameters()).dtype == torch.float32
    info = json.loads((path / "pretrain.json").read_text())
    assert lo <= info["shipped"]["test_greedy_acc"] <= 0.60  # leaves room for RL
    assert info["command"].startswith("rspo pretrain")


def test_eval_cli_writes_results_and_responses(tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["splits=[validation]", "limit=24", "n=2", f"out_dir={out}", "threads=1"]
    assert main(["eval", f"model={BASE_POLICY_DIR}", *args]) == 0
    text = capsys.readouterr().out
    assert "greedy" in text and "sampled(T=1)" in text and "avg@2" in text and "pass@2" in text
    rows = [json.loads(x) for x in (out / "responses-validation.jsonl").read_text().splitlines()]
    assert len(rows) == 24 * 3 and {r["mode"] for r in rows} == {"greedy", "sampled(T=1)"}
    assert all(r["reward"] in (0.0, 0.1, 1.0) and r["prompt"].endswith("\n") for r in rows)
    assert all(r["correct"] == (r["reason"] == "correct") for r in rows)
    res = json.loads((out / "results.json").read_text())["results"]
    greedy = sum(r["correct"] for r in rows if r["mode"] == "greedy") / 24
    assert res["validation"]["greedy_pass@1"] == pytest.approx(greedy, abs=1e-12)
    assert (out / "results.md").read_text().count("| validation |") == 1
    # its own output is replaced only with --overwrite; the sampled responses are seeded (the same again)
    assert main(["eval", "model=base", *args]) == 2
    assert main(["eval", "model=base", *args, "--overwrite"]) == 0
    again = [json.loads(x) for x in (out / "responses-validation.jsonl").read_text().splitlines()]
    assert [r["response"] for r in again] == [r["response"] for r in rows]


def test_load_policy_errors(tmp_path):
    from rspo.errors import ModelError

    with pytest.raises(ModelError, match="does not exist"):
        load_policy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_policy(tmp_path / "empty")
    assert main(["eval", f"model={tmp_path / 'nope'}"]) == 2


def test_demo_runs_end_to_end(tmp_path, capsys):
    from rspo.lab.demo import DemoConfig, run_demo

    out = tmp_path / "demo"
    over = ["steps=2", "rollout.prompts_per_step=4", "mini_batch_size=8", "eval_every=1", "eval_problems=8"]
    cfg = DemoConfig(overrides=over, out_dir=str(out), eval_limit=16)
    assert run_demo(cfg, progress=False) == 0
    text = capsys.readouterr().out
    assert "base" in text and "GRPO" in text and "RSPO" in text and "greedy pass@1" in text
    assert "tokens with gamma < 0.95" in text and "tokens keeping all experts" in text and "curves.png" in text
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["after"]) == {"grpo", "rspo"} and set(summary["drift"]) == {"grpo", "rspo"}
    for arm in ("grpo", "rspo"):
        rows = [json.loads(x) for x in (out / arm / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2]  # each run really ran, in its own process
        assert 0 < summary["drift"][arm]["gamma_mean"] <= 1 and 0 <= summary["drift"][arm]["keep_all"] <= 1
        assert (out / f"test-after-{arm}.jsonl").is_file()
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # a second demo replaces only the first one's files, with --overwrite
    assert run_demo(cfg, progress=False, overwrite=True) == 0
