"""RSPOTrainer under `accelerate launch --cpu --num_processes 2` (run by tests/test_trl_integration.py)."""

from __future__ import annotations

import json
import sys
import tempfile

from datasets import Dataset

from rspo.checkpoint import load_policy
from rspo.integrations.trl import RSPOConfig, RSPOTrainer
from rspo.tasks.countdown import CountdownReward, CountdownSplits, Problem, make_prompt

policy, out = sys.argv[1], sys.argv[2]
model, tok = load_policy(policy)
stream = CountdownSplits().train_stream(seed=0)
rows = [next(stream) for _ in range(32)]
data = Dataset.from_dict({"prompt": [make_prompt(p) for p in rows], "numbers": [list(p.numbers) for p in rows],
                          "target": [p.target for p in rows]})  # fmt: skip
reward = CountdownReward()


def countdown_reward(prompts, completions, numbers, target, **kw):
    return [reward(c, Problem(tuple(n), t)) for c, n, t in zip(completions, numbers, target, strict=True)]


args = RSPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, gradient_checkpointing=False,
                  per_device_train_batch_size=4, steps_per_generation=2, num_generations=4, max_completion_length=14,
                  max_steps=4, learning_rate=3e-3, beta=0.0, logging_steps=1, report_to=[], save_strategy="no",
                  seed=0, objective="rspo")  # fmt: skip
trainer = RSPOTrainer(model=model, reward_funcs=countdown_reward, args=args, train_dataset=data, processing_class=tok)
trainer.train()
if trainer.accelerator.is_main_process:
    logs = [h for h in trainer.state.log_history if "router/gamma_mean" in h]
    with open(out, "w") as f:
        json.dump({"processes": trainer.accelerator.num_processes, "gammas": [h["router/gamma_mean"] for h in logs]}, f)
