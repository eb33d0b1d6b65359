"""rspo inside TRL's GRPOTrainer: equality with our trainer's update, and short end-to-end runs on CPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("trl")

from rspo.integrations.trl import RSPOConfig, RSPOTrainer, task_dataset, task_reward_func
from rspo.policy import load_policy
from rspo.tasks import make_task
from rspo.trainer import Trainer
from tests.test_trainer import tiny_cfg

COUNTDOWN = make_task("countdown")


def countdown_rows(n: int) -> list:
    stream = COUNTDOWN.train_examples(seed=3)
    return [next(stream) for _ in range(n)]


def make_trainer(model, tok, tmp_path, **kw) -> RSPOTrainer:
    args = dict(
        output_dir=str(tmp_path / "trl"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        per_device_train_batch_size=8,
        steps_per_generation=2,
        num_generations=4,
        max_completion_length=14,
        max_steps=4,
        learning_rate=3e-3,
        save_strategy="no",
        seed=0,
        beta=0.0,
    )
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = countdown_rows(16)
        return RSPOTrainer(
            model=model,
            reward_funcs=task_reward_func(COUNTDOWN, rows),
            args=RSPOConfig(**args),
            train_dataset=task_dataset(COUNTDOWN, rows),
            processing_class=tok,
        )


@pytest.mark.parametrize("objective", ["rspo", "grpo_rs", "gspo_token"])
def test_loss_and_gradients_equal_our_trainer(tiny_policy, tmp_path, objective):
    name, rs = ("grpo", True) if objective == "grpo_rs" else (objective, None)
    over = {"objective__name": name, "mini_batch_size": 16}
    if rs:
        over["router_shift__enabled"] = True
    if name == "gspo_token":
        over.update(objective__clip_low=0.05, objective__clip_high=0.05)
    ours = Trainer(tiny_cfg(tiny_policy, tmp_path / "ours", **over), progress=False)
    b = ours.rollout()
    ours.score_and_advantages(b)
    ours.old_pass(b)
    with torch.no_grad():  # make the policy differ from the old one, so ratios and gamma are not 1
        for p in ours.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    trl_model = copy.deepcopy(ours.model)
    rows = torch.arange(len(b.texts))
    loss_a, m_a = ours.policy_loss(b, rows)
    loss_a.backward()
    grads_a = {n: p.grad.clone() for n, p in ours.model.named_parameters() if p.grad is not None}

    extra = {"epsilon": 0.05, "epsilon_high": 0.05} if name == "gspo_token" else {}
    if name != "rspo":
        extra["loss_type"] = "grpo"  # rspo train's token aggregation (TRL's default is dapo)
    tr = make_trainer(trl_model, ours.tok, tmp_path, objective=name, router_shift=rs, **extra)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    p = b.prompt_len
    inputs = {
        "prompt_ids": b.sequences[:, :p],
        "prompt_mask": b.attention_mask[:, :p],
        "completion_ids": b.sequences[:, p:],
        "completion_mask": b.response_mask.long(),
        "advantages": b.advantages,
        "old_per_token_logps": b.old_log_probs,
        "router_old_idx": b.old.trace.topk_idx,
        "router_old_logp": b.old.trace.logp,
    }
    loss_b = tr._compute_loss(tr.model, inputs)
    loss_b.backward()
    grads_b = {n: q.grad for n, q in tr.model.named_parameters() if q.grad is not None}
    # TRL scores tokens with a fused LM head: equal up to float32 rounding
    torch.testing.assert_close(loss_b.detach(), loss_a.detach(), atol=2e-6, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-6, rtol=2e-4, msg=n)
    assert m_a["router/gamma_mean"] < 1.0
    assert tr._metrics["train"]["router/gamma_mean"][-1] == pytest.approx(m_a["router/gamma_mean"], abs=1e-6)


def _gamma_log(trainer):
    return [h["router/gamma_mean"] for h in trainer.state.log_history if "router/gamma_mean" in h]


@pytest.mark.parametrize(
    "kw",
    [
        {"objective": "rspo"},
        {"objective": "grpo"},
        {"objective": "grpo", "router_shift": True},
        {"objective": "gspo", "epsilon": 0.05, "epsilon_high": 0.05},
        {"objective": "gspo_token", "epsilon": 0.05, "epsilon_high": 0.05, "router_shift": True},
        {"objective": "gmpo"},
        {"objective": "rspo", "routing_control": "freeze"},
        {"objective": "grpo", "routing_control": "replay_indices"},
        {
            "objective": "rspo",
            "gradient_accumulation_steps": 2,
            "per_device_train_batch_size": 4,
            "steps_per_generation": 4,
        },
    ],
    ids=["rspo", "grpo", "grpo_rs", "gspo", "gspo_token_rs", "gmpo", "rspo_freeze", "grpo_replay_indices", "rspo_ga2"],
)
def test_end_to_end_runs(tiny_policy, tmp_path, kw):
    pol = load_policy(tiny_policy)
    model, tok = pol.model, pol.tokenizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = make_trainer(model, tok, tmp_path, **kw)
    tr.train()
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed
    gates = {n for n in before if n.endswith("mlp.gate.weight")}
    if kw.get("routing_control") == "freeze":
        assert not changed & gates
    gammas = _gamma_log(tr)
    assert len(gammas) == 4
    # two optimizer steps per generation batch: the first is on-policy (gamma exactly 1), the second not
    assert gammas[0] == 1.0 and gammas[2] == 1.0
    assert gammas[1] < 1.0 and gammas[3] < 1.0
    assert all("clip_ratio/region_mean" in h for h in tr.state.log_history if "router/gamma_mean" in h)


def test_old_pass_forced_when_trl_would_skip_it(tiny_policy, tmp_path):
    pol = load_policy(tiny_policy)
    model, tok = pol.model, pol.tokenizer
    # one optimizer step per generation: TRL judges every step on-policy and skips the old pass
    tr = make_trainer(model, tok, tmp_path, steps_per_generation=1, max_steps=2)
    tr.train()
    assert _gamma_log(tr) == [1.0, 1.0]  # the trace exists (forced pass) and the policy had not changed
    assert tr.state.log_history[0]["ratio/std"] == 0.0


def test_config_errors():
    with pytest.raises(ValueError, match="objective='ppo'; valid"):
        RSPOConfig(output_dir="x", objective="ppo", use_cpu=True)
    with pytest.raises(ValueError, match="'gmpo' cannot use router shift"):
        RSPOConfig(output_dir="x", objective="gmpo", router_shift=True, use_cpu=True)
    with pytest.raises(ValueError, match="routing_control='replay'"):
        RSPOConfig(output_dir="x", routing_control="replay", use_cpu=True)


def test_example_script_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "trl_countdown.py"
    r = subprocess.run([sys.executable, str(script), "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("step")]
    assert len(lines) == 2 and "gamma 1.00000" in lines[0]


def test_num_iterations_reuses_the_trace(tiny_policy, tmp_path):
    pol = load_policy(tiny_policy)
    model, tok = pol.model, pol.tokenizer
    tr = make_trainer(model, tok, tmp_path, num_iterations=2, max_steps=4)  # 2 steps x 2 iterations per batch
    tr.train()
    gammas = _gamma_log(tr)
    assert gammas[0] == 1.0 and all(g < 1.0 for g in gammas[1:4])


def test_two_cpu_processes(tiny_policy, tmp_path):
    """RSPOTrainer under torchrun with 2 processes (gloo on CPU): trains, metrics gathered across ranks."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "scripts" / "trl_two_process.py"
    out = tmp_path / "two.json"
    import socket

    with socket.socket() as s:  # a free port: a fixed one can still be taken (TIME_WAIT, another run)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(script),
        tiny_policy,
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["processes"] == 2
    g = res["gammas"]
    assert len(g) == 4 and g[0] == 1.0 and g[2] == 1.0 and g[1] < 1.0 and g[3] < 1.0, g


def test_math_task_with_chat_prompts(family_dirs, tmp_path):
    """The TRL helpers are task-generic: math examples as a conversational dataset (TRL applies the chat
    template), scored by the math task (here with a user reward function, so a random model gets a signal)."""
    from rspo.tasks import make_task

    task = make_task("math", {"train": ["builtin:math/arith-train.jsonl"], "reward_fn": "tests.helpers:length_reward"})
    examples = task.train_set()[:16]
    ds = task_dataset(task, examples)
    assert isinstance(ds[0]["prompt"], list) and ds[0]["prompt"][0]["role"] == "user"
    reward = task_reward_func(task, examples)
    assert reward(None, ["ab", [{"role": "assistant", "content": "abc"}]], [0, 1]) == [1.0, 0.0]
    pol = load_policy(family_dirs["tiny-qwen3-moe"])
    args = dict(
        output_dir=str(tmp_path / "trl"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        per_device_train_batch_size=8,
        steps_per_generation=2,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        save_strategy="no",
        seed=0,
        beta=0.0,
        objective="rspo",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = RSPOTrainer(
            model=pol.model,
            reward_funcs=reward,
            args=RSPOConfig(**args),
            train_dataset=ds,
            processing_class=pol.tokenizer,
        )
        tr.train()
    gammas = _gamma_log(tr)
    assert len(gammas) == 2 and gammas[0] == 1.0 and gammas[1] < 1.0
