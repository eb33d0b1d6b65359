"""Synthetic arithmetic with boxed answers: the tiny math example's pretraining and RL data, graded like the
math task, and the generator of the shipped files in ``data/math/`` (:func:`builtin_files`)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from rspo.tasks.base import Prompt, Task, Verdict, register_task
from rspo.tasks.files import DATA_DIR
from rspo.tasks.math import DEFAULT_INSTRUCTION, MathExample, MathGrader, MathTask, example_of, last_boxed, to_verl_row


def arithmetic_problem(rng: random.Random) -> dict[str, str]:
    """One synthetic problem with a worked solution ending in ``\\boxed{answer}`` (plain format)."""
    kind = rng.choice(("add", "sub", "mul", "add3"))
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if kind == "add":
        q, work, ans = f"{a} + {b}", f"{a} + {b} = {a + b}.", a + b
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        q, work, ans = f"{a} - {b}", f"{a} - {b} = {a - b}.", a - b
    elif kind == "mul":
        a = rng.randint(2, 9)
        q, work, ans = f"{a} \\times {b}", f"{a} \\times {b} = {a * b}.", a * b
    else:
        c = rng.randint(2, 99)
        q, work, ans = f"{a} + {b} + {c}", f"{a} + {b} = {a + b}, and {a + b} + {c} = {a + b + c}.", a + b + c
    return {"problem": f"What is ${q}$?", "solution": f"{work} The answer is $\\boxed{{{ans}}}$.", "answer": str(ans)}


@dataclass
class ArithmeticOptions:
    instruction: str = DEFAULT_INSTRUCTION
    """Appended to every problem."""
    prompt_format: Literal["chat", "text"] = "chat"
    """Prompts as chat messages or plain text."""
    max_new_tokens: int = 64
    """Response length limit (a worked solution is about 40 tokens of the tiny BPE tokenizer)."""
    n_test: int = 200
    """Size of the fixed test split (seeded; the train stream never repeats one of its problems)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.n_test < 1:
            raise ValueError("task.options.max_new_tokens and n_test must be >= 1")


@register_task
class ArithmeticTask(Task):
    """Synthetic arithmetic with boxed answers (an endless seeded stream and a fixed test split), graded
    like the math task: the tiny example's pretraining data and the source of its shipped data files."""

    name = "arithmetic"
    reasons = MathTask.reasons
    Options = ArithmeticOptions

    def __init__(self, options: ArithmeticOptions | None = None) -> None:
        super().__init__(options)
        self.grader = MathGrader(use_math_verify=False)  # integer answers: the string comparison is exact
        rng = random.Random("arithmetic/test")
        rows, seen = [], set()
        while len(rows) < self.options.n_test:
            row = arithmetic_problem(rng)
            if row["problem"] not in seen:
                seen.add(row["problem"])
                rows.append(row)
        self._test_rows, self._held_out = rows, seen

    def _make(self, row: dict, where: str) -> MathExample:
        return example_of({**row, "id": where}, where, self.options.instruction, self.options.prompt_format)

    def train_examples(self, seed: int) -> Iterator[MathExample]:
        rng = random.Random(f"arithmetic/train/{seed}")
        i = 0
        while True:
            row = arithmetic_problem(rng)
            if row["problem"] not in self._held_out:
                i += 1
                yield self._make(row, f"train-{seed}-{i}")

    def eval_splits(self) -> list[str]:
        return ["test"]

    def eval_examples(self, split: str) -> list[MathExample]:
        if split != "test":
            raise self.unknown_split(split)
        return [self._make(r, f"test-{i}") for i, r in enumerate(self._test_rows)]

    def prompt(self, example: MathExample) -> Prompt:
        return example.prompt

    def reference(self, example: MathExample) -> str | None:
        return example.solution

    def verdict(self, response: str, example: MathExample) -> Verdict:
        answer = last_boxed(response)
        if answer is None:
            return Verdict(0.0, "no_answer", False)
        ok = self.grader.correct(answer, example.answer)
        return Verdict(float(ok), "correct" if ok else "wrong_answer", ok)

    def record(self, example: MathExample) -> dict:
        return {"id": example.id, "answer": example.answer}


# ----------------------------------------------------------------------------------------
# The shipped data files (regenerated identically by this function; a test checks it)
# ----------------------------------------------------------------------------------------
def builtin_files() -> dict[str, list[dict]]:
    """The derived files of ``data/math/``: the sample set in verl's format and the arithmetic splits."""
    sample = [json.loads(x) for x in (DATA_DIR / "math" / "sample-plain.jsonl").read_text().splitlines()]
    test_task = ArithmeticTask()
    train, rng, seen = [], random.Random("arithmetic/file/train"), set(test_task._held_out)
    while len(train) < 2000:
        row = arithmetic_problem(rng)
        if row["problem"] not in seen:
            seen.add(row["problem"])
            train.append({"id": f"arith-train-{len(train)}", **row})
    test = [{"id": f"arith-test-{i}", **r} for i, r in enumerate(test_task._test_rows)]
    return {
        "sample-verl.jsonl": [to_verl_row(r) for r in sample],
        "arith-train.jsonl": train,
        "arith-test.jsonl": [to_verl_row(r, data_source="rspo/arithmetic") for r in test],
    }


def write_builtin_files() -> None:
    for name, rows in builtin_files().items():
        (DATA_DIR / "math" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
