"""Evaluation of a policy on a task: greedy pass@1, sampled avg@n and the unbiased pass@k, per benchmark.

The trainer's periodic validation and ``rspo eval`` use the same :func:`evaluate`. Correctness is the
task's ``Verdict.correct`` (never a reason string); the response length is the task's unless given.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rspo.policy import HFSampler, Policy, Sampler
from rspo.scoring import Scorer
from rspo.tasks import Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021, the Codex paper):
    ``1 - C(n - c, k) / C(n, k)``, as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks + ([n] if ks[-1] != n else [])


@dataclass
class EvalResult:
    """One evaluation pass over ``examples`` examples with ``n`` responses each (greedy: n = 1)."""

    mode: str  # "greedy" or "sampled(T=..)"
    n: int
    examples: int
    accuracy: float  # greedy pass@1, or avg@n: mean over examples of (correct / n)
    pass_at: dict[int, float]  # unbiased pass@k for k in 1, 2, 4, ..., n
    mean_reward: float
    reasons: Counter = field(default_factory=Counter)
    records: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        total = max(len(self.records), 1)
        why = ", ".join(f"{k} {v / total:.1%}" for k, v in self.reasons.most_common())
        ks = "  ".join(f"pass@{k} {v:.1%}" for k, v in self.pass_at.items() if k > 1)
        name = "pass@1" if self.n == 1 else f"avg@{self.n}"
        return f"{self.mode:16s} {name} {self.accuracy:.1%}  {ks}  mean reward {self.mean_reward:.3f}  ({why})"


def evaluate(
    policy: Policy,
    task: Task,
    examples: Sequence[Any],
    *,
    greedy: bool = True,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    sampler: Sampler | None = None,
    scorer: Scorer | None = None,
    timeout_s: float | None = 10.0,
    progress: bool = False,
) -> EvalResult:
    """``n`` responses per example (greedy: one), scored by ``task``; pass@k over the n per example.

    Sampling is seeded per chunk of ``batch_size`` responses (``seed + chunk index``), so a pass is
    reproducible and the same checks at different steps of a run are comparable. ``scorer``: scoring
    workers to reuse (a trainer's); else some are started for this call (``timeout_s`` per reward call).
    """
    if n < 1 or (greedy and n != 1):
        raise ValueError(f"n must be >= 1 (and 1 for greedy), got {n}")
    sampler = sampler or HFSampler(policy)
    own = scorer is None
    scorer = scorer or Scorer(task, timeout_s=timeout_s)
    items = [ex for ex in examples for _ in range(n)]  # the n responses of an example are adjacent
    max_new = max_new_tokens or task.max_new_tokens
    records: list[dict] = []
    chunks = range(0, len(items), batch_size)
    bar = tqdm(total=len(items), desc="eval", disable=not progress, leave=False, unit="resp")
    for ci, start in enumerate(chunks):
        chunk = items[start : start + batch_size]
        prompts = [task.prompt(ex) for ex in chunk]
        gen = sampler.sample(prompts, max_new_tokens=max_new, greedy=greedy, temperature=temperature, top_p=top_p,
                             seed=None if greedy else seed + ci, stop_strings=task.stop_strings)  # fmt: skip
        scored = scorer.score(gen.texts, chunk)
        for j, (ex, prompt, text) in enumerate(zip(chunk, prompts, gen.texts, strict=True)):
            records.append({**task.record(ex), "prompt": policy.render(prompt), "response": text,
                            "reward": scored.rewards[j], "reason": scored.reasons[j],
                            "correct": scored.correct[j], "sample": (start + j) % n})  # fmt: skip
        bar.update(len(chunk))
    bar.close()
    if own:
        scorer.close()
    per_example = [records[i : i + n] for i in range(0, len(records), n)]
    counts = [sum(r["correct"] for r in rs) for rs in per_example]
    m = max(len(per_example), 1)
    return EvalResult(
        mode="greedy" if greedy else f"sampled(T={temperature:g})",
        n=n,
        examples=len(per_example),
        accuracy=sum(c / n for c in counts) / m,
        pass_at={k: sum(pass_at_k(n, c, k) for c in counts) / m for k in k_values(n)},
        mean_reward=sum(r["reward"] for r in records) / max(len(records), 1),
        reasons=Counter(r["reason"] for r in records),
        records=records,
    )


def write_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def results_table(results: dict[str, dict[str, EvalResult]]) -> tuple[str, dict[str, Any]]:
    """A Markdown table (one row per benchmark, then their average) and the same numbers as JSON.

    ``results``: benchmark -> {"greedy": EvalResult, "sampled": EvalResult (optional)}.
    """
    ks = sorted({k for r in results.values() if "sampled" in r for k in r["sampled"].pass_at if k > 1})
    n = next((r["sampled"].n for r in results.values() if "sampled" in r), None)
    head = ["benchmark", "examples", "greedy pass@1"]
    if n is not None:
        head += [f"avg@{n}"] + [f"pass@{k}" for k in ks]
    rows, data = [], {}
    for name, r in results.items():
        g = r["greedy"]
        row = {"examples": g.examples, "greedy_pass@1": g.accuracy}
        if "sampled" in r:
            s = r["sampled"]
            row[f"avg@{s.n}"] = s.accuracy
            row |= {f"pass@{k}": s.pass_at[k] for k in ks if k in s.pass_at}
        data[name] = row
        rows.append(row)
    keys = [k for k in rows[0] if k != "examples"] if rows else []
    data["average"] = {k: sum(r[k] for r in rows) / len(rows) for k in keys} if rows else {}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in data.items():
        cells = [name, str(row.get("examples", ""))] + [f"{row[k]:.1%}" if k in row else "" for k in
                                                         ["greedy_pass@1"] + ([f"avg@{n}"] if n else [])
                                                         + [f"pass@{k}" for k in ks]]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), data
