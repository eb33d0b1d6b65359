"""Step time of RSPOTrainer (objective rspo, router capture + gather) against plain TRL GRPOTrainer, one run.

Same model (the shipped base policy), same prompts and seeds, 16 prompts x 8 completions, 32 new
tokens, two optimizer steps of 64 per rollout batch, no KL, no aux loss, fp32 CPU. Runs alternate
GRPO, RSPO, GRPO, RSPO; the median of pair ratios and the ratio of median `train()` times are
reported (target <= 1.10).

    python benchmarks/trl_rspo_vs_grpo.py [--steps 8 --pairs 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings

import torch
from trl import GRPOConfig, GRPOTrainer

from rspo.assets import policy_dir
from rspo.integrations.trl import RSPOConfig, RSPOTrainer, task_dataset, task_reward_func
from rspo.policy import load_policy
from rspo.tasks import make_task


def run(kind: str, steps: int) -> tuple[float, int]:
    policy = load_policy(policy_dir("countdown-base"))
    model, tok = policy.model, policy.tokenizer
    task = make_task("countdown")
    stream = task.train_examples(seed=1)
    rows = [next(stream) for _ in range(8 * steps)]
    data, reward_fn = task_dataset(task, rows), task_reward_func(task, rows)
    common = dict(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=64,
        steps_per_generation=2,
        num_generations=8,
        max_completion_length=32,
        learning_rate=1e-5,
        beta=0.0,
        router_aux_loss_coef=0.0,
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        shuffle_dataset=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "grpo":
            tr = GRPOTrainer(
                model=model,
                reward_funcs=reward_fn,
                args=GRPOConfig(**common, loss_type="grpo"),
                train_dataset=data,
                processing_class=tok,
            )
        else:
            tr = RSPOTrainer(
                model=model,
                reward_funcs=reward_fn,
                args=RSPOConfig(**common, objective="rspo"),
                train_dataset=data,
                processing_class=tok,
            )
        t0 = time.perf_counter()
        tr.train()
        dt = time.perf_counter() - t0
    lengths = [h["completions/mean_length"] for h in tr.state.log_history if "completions/mean_length" in h]
    return dt, round(sum(lengths) / max(len(lengths), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(
        f"# {platform.node()} {platform.machine()}, torch {torch.__version__}; 128 completions per rollout batch, "
        f"2 optimizer steps each, {args.steps} steps per run"
    )
    g, r = [], []
    for i in range(args.pairs):
        g.append(run("grpo", args.steps))
        r.append(run("rspo", args.steps))
        print(
            f"pair {i + 1}: GRPOTrainer {g[-1][0]:6.1f} s (mean length {g[-1][1]})   "
            f"RSPOTrainer {r[-1][0]:6.1f} s (mean length {r[-1][1]})   ratio {r[-1][0] / g[-1][0]:.3f}"
        )
    pairs = statistics.median(b[0] / a[0] for a, b in zip(g, r, strict=True))
    medians = statistics.median(b[0] for b in r) / statistics.median(a[0] for a in g)
    print(
        f"RSPOTrainer / GRPOTrainer: median of pair ratios {pairs:.3f}, ratio of median times {medians:.3f} "
        f"(target <= 1.10)"
    )


if __name__ == "__main__":
    main()
