"""RSPOTrainer under `accelerate launch --cpu --num_processes 2` (run by tests/test_trl_integration.py)."""

from __future__ import annotations

import json
import sys
import tempfile

from rspo.integrations.trl import RSPOConfig, RSPOTrainer, task_dataset, task_reward_func
from rspo.policy import load_policy
from rspo.tasks import make_task

policy_dir, out = sys.argv[1], sys.argv[2]
policy = load_policy(policy_dir)
model, tok = policy.model, policy.tokenizer
task = make_task("countdown")
stream = task.train_examples(seed=0)
rows = [next(stream) for _ in range(32)]
data, countdown_reward = task_dataset(task, rows), task_reward_func(task, rows)

args = RSPOConfig(
    output_dir=tempfile.mkdtemp(),
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    per_device_train_batch_size=4,
    steps_per_generation=2,
    num_generations=4,
    max_completion_length=14,
    max_steps=4,
    learning_rate=3e-3,
    beta=0.0,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    seed=0,
    objective="rspo",
)
trainer = RSPOTrainer(model=model, reward_funcs=countdown_reward, args=args, train_dataset=data, processing_class=tok)
trainer.train()
if trainer.accelerator.is_main_process:
    logs = [h for h in trainer.state.log_history if "router/gamma_mean" in h]
    with open(out, "w") as f:
        json.dump({"processes": trainer.accelerator.num_processes, "gammas": [h["router/gamma_mean"] for h in logs]}, f)
