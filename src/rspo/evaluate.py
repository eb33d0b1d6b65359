"""Evaluation of a policy on a task: greedy pass@1, sampled avg@n and the unbiased pass@k, per benchmark.

The trainer's periodic validation and ``rspo eval`` (:class:`EvalConfig`, :func:`run_eval`) use the same
:func:`evaluate`. Correctness is the task's ``Verdict.correct`` (never a reason string); the response length
is the task's unless given.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rspo.errors import FieldError
from rspo.policy import Device, DType, Policy
from rspo.sampler import HFSampler, Sampler
from rspo.scoring import Scorer, ScoringConfig
from rspo.tasks import Task, TaskConfig


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
        gen = sampler.sample(
            prompts,
            max_new_tokens=max_new,
            greedy=greedy,
            temperature=temperature,
            top_p=top_p,
            seed=None if greedy else seed + ci,
            stop_strings=task.stop_strings,
        )
        scored = scorer.score(gen.texts, chunk)
        for j, (ex, prompt, text) in enumerate(zip(chunk, prompts, gen.texts, strict=True)):
            group = task.group(ex)
            records.append(
                {
                    **task.record(ex),
                    **({"group": group} if group is not None else {}),
                    "prompt": policy.render(prompt),
                    "response": text,
                    "reward": scored.rewards[j],
                    "reason": scored.reasons[j],
                    "correct": scored.correct[j],
                    "sample": (start + j) % n,
                }
            )
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
        cells = [name, str(row.get("examples", ""))] + [
            f"{row[k]:.1%}" if k in row else ""
            for k in ["greedy_pass@1"] + ([f"avg@{n}"] if n else []) + [f"pass@{k}" for k in ks]
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), data


# ----------------------------------------------------------------------------------------
# rspo eval
# ----------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """``rspo eval``: a policy on one or several benchmarks (YAML plus dotted overrides, like ``rspo train``)."""

    model: str = "base"
    """Policy: a checkpoint directory, a hub id (from the local cache), base, or builtin:NAME."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The task and its options; benchmarks of the math and code tasks are task.options.eval.NAME=PATH."""
    splits: list[str] = field(default_factory=list)
    """Splits to evaluate; [] = every task.options.eval file if given, else the task's last split (countdown: test)."""
    n: int = 1
    """Sampled responses per example for avg@n and pass@k (0: greedy only)."""
    temperature: float = 1.0
    """Sampling temperature of the sampled pass."""
    top_p: float = 1.0
    """Nucleus sampling threshold of the sampled pass, in (0, 1]."""
    max_new_tokens: int | None = None
    """Response length limit; None = the task's."""
    limit: int | None = None
    """Evaluate only the first N examples of each split."""
    batch_size: int = 128
    """Responses generated at once."""
    seed: int = 0
    """Seed of the sampled pass (per chunk: seed + chunk index)."""
    threads: int = 2
    """torch CPU threads."""
    device: Device = "auto"
    """auto (cuda if available), cpu or cuda."""
    dtype: DType = "float32"
    """float32 or bfloat16."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """The reward calls' time and memory bounds."""
    out_dir: str | None = None
    """results.md, results.json and responses-SPLIT.jsonl; None = runs/eval/<model>-<task>."""

    def __post_init__(self) -> None:
        if self.n < 0:
            raise FieldError("n", f"must be >= 0 (0: greedy only), got {self.n}")
        if not self.temperature > 0:
            raise FieldError("temperature", f"must be a finite number > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FieldError("top_p", f"must be in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise FieldError(name, f"must be >= 1 (or null), got {v}")
        for name in ("batch_size", "threads"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")


def run_eval(cfg: EvalConfig, overwrite: bool = False, progress: bool = True) -> Path:
    """Evaluate ``cfg.model`` on the splits (greedy pass@1, and avg@n with pass@k when ``n`` > 0), print a table,
    and write results.md, results.json and every response into ``out_dir``; returns the directory. Everything
    that can be wrong with the input fails before a file is written."""
    import torch

    from rspo.policy import load_policy, resolve_model_path
    from rspo.rundir import RunDir

    task = cfg.task.build()
    splits = cfg.splits or (list(cfg.task.options["eval"]) if cfg.task.options.get("eval") else task.eval_splits()[-1:])
    for split in splits:
        task.eval_examples(split)  # an unknown split fails before the model is loaded
    model_path = resolve_model_path(cfg.model)
    out_dir = cfg.out_dir or f"runs/eval/{Path(model_path).name}-{task.name}"
    torch.set_num_threads(cfg.threads)
    loaded: list[Policy] = []  # the model loads (and fails on a bad checkpoint) before the directory is made
    run = RunDir.open_run(
        out_dir,
        "eval",
        overwrite=overwrite,
        before_create=lambda: loaded.append(load_policy(model_path, device=cfg.device, dtype=cfg.dtype)),
    )
    policy = loaded[0]
    scorer = cfg.scoring.scorer(task)
    results: dict = {}
    common = {
        "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "scorer": scorer,
        "progress": progress,
    }
    try:
        for split in splits:
            examples = task.eval_examples(split)[: cfg.limit]
            print(f"{split}: {len(examples)} examples")
            res = {"greedy": evaluate(policy, task, examples, greedy=True, **common)}
            if cfg.n:
                res["sampled"] = evaluate(
                    policy,
                    task,
                    examples,
                    greedy=False,
                    n=cfg.n,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    **common,
                )
            for r in res.values():
                print("  " + r.summary())
            records = [{**rec, "mode": r.mode} for r in res.values() for rec in r.records]
            run.write_jsonl(f"responses-{split}.jsonl", records)
            results[split] = res
    finally:
        scorer.close()
        run.close()
    table, data = results_table(results)
    settings = (
        f"model {model_path}, task {task.name}, greedy and {cfg.n} sampled response(s) per example "
        f"at T={cfg.temperature:g}, top-p {cfg.top_p:g}, seed {cfg.seed}"
    )
    run.write_text("results.md", f"# Evaluation\n\n{settings}\n\n{table}\n")
    run.write_json("results.json", {"settings": settings, "results": data})
    print(f"\n{table}\n\nresults and responses: {run.path}")
    return run.path
