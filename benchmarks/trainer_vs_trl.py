"""End-to-end RL throughput: `rspo` Trainer against TRL's GRPOTrainer, measured side by side in one run.

Same base policy, same Countdown prompts, group size 8, 16 prompts per rollout batch (128
responses), max 32 new tokens, temperature 1, two optimizer steps (mini-batch 64) per rollout
batch, GRPO loss, no KL, no MoE aux loss (TRL adds it by default for MoE models, with the
config's coefficient; ours has it off, so TRL's is turned off for equal work), fp32 on CPU.
Reports completion tokens per second of the whole loop (generation, reward, old log-probs,
updates), alternating runs A B A B; ratio = ours / TRL.

    python benchmarks/trainer_vs_trl.py [--steps 4 --pairs 2 --model DIR]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from rspo.assets import policy_dir
from rspo.config import build
from rspo.policy import load_policy
from rspo.rundir import read_metrics
from rspo.tasks import make_task
from rspo.train_config import TrainConfig
from rspo.trainer import Trainer

PROMPTS, GROUP, NEW_TOKENS, MINI = 16, 8, 32, 64


def run_ours(model_dir: str, steps: int, work: Path) -> float:
    out = work / f"ours-{time.time_ns()}"
    cfg = build(
        TrainConfig,
        {
            "model": model_dir,
            "out_dir": str(out),
            "steps": steps,
            "mini_batch_size": MINI,
            "eval_every": 0,
            "checkpoint_every": 10**6,
            "log_router": False,
            "objective": {"name": "grpo"},
            "optim": {"lr": 1e-5},
            "rollout": {"prompts_per_step": PROMPTS, "group_size": GROUP, "max_new_tokens": NEW_TOKENS},
        },
    )
    tr = Trainer(cfg, progress=False)
    t0 = time.perf_counter()
    tr.train()
    dt = time.perf_counter() - t0
    rows = read_metrics(out)
    tokens = sum(r["response/length_mean"] * PROMPTS * GROUP for r in rows)
    shutil.rmtree(out, ignore_errors=True)
    return tokens / dt


def run_trl(model_dir: str, steps: int, work: Path) -> float:
    from trl import GRPOConfig, GRPOTrainer

    from rspo.integrations.trl import task_dataset, task_reward_func

    policy = load_policy(model_dir)
    model, tok = policy.model, policy.tokenizer
    task = make_task("countdown")
    problems = task.train_examples(seed=1)
    rows = [next(problems) for _ in range(PROMPTS * steps)]
    data, countdown_reward = task_dataset(task, rows), task_reward_func(task, rows)
    args = GRPOConfig(
        output_dir=str(work / "trl"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=MINI,
        steps_per_generation=PROMPTS * GROUP // MINI,
        num_generations=GROUP,
        max_completion_length=NEW_TOKENS,
        max_steps=steps * PROMPTS * GROUP // MINI,
        learning_rate=1e-5,
        beta=0.0,
        loss_type="grpo",
        temperature=1.0,
        logging_steps=1,
        router_aux_loss_coef=0.0,
        report_to=[],
        save_strategy="no",
        shuffle_dataset=False,
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=model, reward_funcs=countdown_reward, args=args, train_dataset=data, processing_class=tok
        )
        t0 = time.perf_counter()
        trainer.train()
        dt = time.perf_counter() - t0
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    # TRL logs the generation batch's mean length at every optimizer step of that batch
    per_gen = lengths[:: PROMPTS * GROUP // MINI]
    return sum(x * PROMPTS * GROUP for x in per_gen) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="rollout batches per run")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--model", default=str(policy_dir("countdown-base")))
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(
        f"# {platform.node()} {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"{PROMPTS}x{GROUP} responses, {NEW_TOKENS} new tokens, mini-batch {MINI}, {args.steps} rollout batches"
    )
    work = Path(tempfile.mkdtemp())
    ours, trl = [], []
    for i in range(args.pairs):
        ours.append(run_ours(args.model, args.steps, work))
        trl.append(run_trl(args.model, args.steps, work))
        print(
            f"pair {i + 1}: rspo {ours[-1]:7.0f} tok/s   TRL GRPOTrainer {trl[-1]:7.0f} tok/s   "
            f"ratio {ours[-1] / trl[-1]:.2f}"
        )
    ratios = [a / b for a, b in zip(ours, trl, strict=True)]
    print(
        f"median: rspo {statistics.median(ours):.0f} tok/s, TRL {statistics.median(trl):.0f} tok/s, "
        f"ratio {statistics.median(ratios):.2f} (target >= 1.5)"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
