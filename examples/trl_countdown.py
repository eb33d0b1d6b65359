"""RSPO inside TRL's GRPOTrainer on the shipped Countdown base policy (runs on this CPU in about a minute).

    python examples/trl_countdown.py [--steps 8 --objective rspo]

Rollout batch 64 = 16 prompts x 4 completions, two optimizer steps of 32 per batch (the second
is off-policy), so the logs show gamma = 1 on the first step of each batch and gamma < 1 on the
second, next to TRL's own metrics.
"""

from __future__ import annotations

import argparse
import tempfile

from rspo.assets import BASE, policy_dir
from rspo.integrations.trl import RSPOConfig, RSPOTrainer, task_dataset, task_reward_func
from rspo.policy import load_policy
from rspo.tasks import make_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps")
    ap.add_argument("--objective", default="rspo")
    args = ap.parse_args()

    policy = load_policy(policy_dir(BASE))
    task = make_task("countdown", {"score_format": 0.0})  # correctness-only reward, as the demo
    stream = task.train_examples(seed=0)
    problems = [next(stream) for _ in range(16 * args.steps)]
    data, countdown_reward = task_dataset(task, problems), task_reward_func(task, problems)

    config = RSPOConfig(
        output_dir=tempfile.mkdtemp(),
        objective=args.objective,
        router_shift_gamma_min=0.5,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,  # CPU settings
        per_device_train_batch_size=32,
        steps_per_generation=2,
        num_generations=4,
        max_completion_length=32,
        temperature=0.7,
        learning_rate=1e-4,
        beta=0.0,
        router_aux_loss_coef=0.0,
        max_steps=args.steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
    )
    trainer = RSPOTrainer(
        model=policy.model,
        reward_funcs=countdown_reward,
        args=config,
        train_dataset=data,
        processing_class=policy.tokenizer,
    )
    trainer.train()
    for h in trainer.state.log_history:
        if "router/gamma_mean" in h:
            reward = f"{h['reward']:.3f}" if "reward" in h else "  -  "  # TRL logs it on generating steps
            print(
                f"step {h['step']:3d}  reward {reward}  gamma {h['router/gamma_mean']:.5f}  "
                f"non-shifted {h['router/non_shifted_ratio']:.3f}  ratio std {h['ratio/std']:.4f}  "
                f"clip {h['clip_ratio/region_mean']:.4f}"
            )


if __name__ == "__main__":
    main()
