"""Greedy and sampled pass@1 on a task split, with the reward distribution and a JSONL of responses."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rspo.rollout import batched, generate
from rspo.scoring import score
from rspo.tasks.countdown import CountdownReward, Problem, make_prompt

MAX_NEW_TOKENS = 32  # "<answer>" + an expression of 4 two-digit numbers + "</answer>" + eos fits in 24


@dataclass
class EvalResult:
    mode: str  # "greedy" or "sampled(T=...)"
    accuracy: float  # share of responses with reward == score_correct (pass@1)
    mean_reward: float
    reasons: Counter = field(default_factory=Counter)
    rewards: Counter = field(default_factory=Counter)
    records: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        n = len(self.records)
        dist = ", ".join(f"{k:g}: {v / n:.1%}" for k, v in sorted(self.rewards.items()))
        why = ", ".join(f"{k} {v / n:.1%}" for k, v in self.reasons.most_common())
        head = f"{self.mode:16s} accuracy {self.accuracy:.1%}  mean reward {self.mean_reward:.3f}"
        return f"{head}  rewards [{dist}]  ({why})"


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    batch_size: int = 128,
    seed: int = 0,
    reward: CountdownReward | None = None,
    progress: bool = False,
    timeout_s: float | None = 10.0,
) -> EvalResult:
    """pass@1 over ``problems``: one greedy (or sampled) response each."""
    reward = reward or CountdownReward()
    records: list[dict] = []
    it = list(batched(list(problems), batch_size))
    for i, chunk in enumerate(tqdm(it, desc="eval", disable=not progress, leave=False)):
        prompts = [make_prompt(p) for p in chunk]
        gen = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, greedy=greedy,
                       temperature=temperature, generator_seed=None if greedy else seed + i)  # fmt: skip
        scored = score(gen.texts, chunk, reward, timeout_s=timeout_s)
        for p, prompt, text, r, why in zip(chunk, prompts, gen.texts, scored.rewards, scored.reasons, strict=True):
            records.append({"numbers": list(p.numbers), "target": p.target, "prompt": prompt, "response": text,
                            "reward": r, "reason": why})  # fmt: skip
    n = max(len(records), 1)
    correct = sum(r["reason"] == "correct" for r in records)
    return EvalResult(
        mode="greedy" if greedy else f"sampled(T={temperature:g})",
        accuracy=correct / n,
        mean_reward=sum(r["reward"] for r in records) / n,
        reasons=Counter(r["reason"] for r in records),
        rewards=Counter(r["reward"] for r in records),
        records=records,
    )


def write_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
