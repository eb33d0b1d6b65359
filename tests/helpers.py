"""Importable helpers for tests that plug user code in by import path (task.name / task.options.reward_fn)."""

from __future__ import annotations

from rspo.tasks import NoOptions, Task, Verdict


def length_reward(response: str, example) -> float:
    """A user reward function: 1 for responses of even length (varies, so random policies get a gradient)."""
    return float(len(response) % 2 == 0)


def not_callable_reward():  # pragma: no cover - only imported
    return None


class EchoTask(Task):
    """A user task (the README's 20-line example, in spirit): prompts are words; reward 1 if echoed."""

    name = "echo"
    reasons = ("echoed", "other")
    Options = NoOptions
    WORDS = ("apple", "river", "stone", "cloud", "music", "light")

    def train_examples(self, seed: int):
        i = seed
        while True:
            yield self.WORDS[i % len(self.WORDS)]
            i += 1

    def eval_splits(self) -> list[str]:
        return ["all"]

    def eval_examples(self, split: str) -> list[str]:
        if split != "all":
            raise self.unknown_split(split)
        return list(self.WORDS)

    def prompt(self, example: str) -> str:
        return f"{example} -> "

    def verdict(self, response: str, example: str) -> Verdict:
        ok = example in response
        return Verdict(float(ok), "echoed" if ok else "other", ok)


class Wrapped:
    """A task with its verdict replaced (subclasses override ``verdict``); everything else is the task's."""

    def __init__(self, task) -> None:
        self.task = task

    def __getattr__(self, name):
        if name == "task":  # during unpickling, before __dict__ is restored
            raise AttributeError(name)
        return getattr(self.task, name)


class FlakyTask(Wrapped):
    """The task, with a verdict that raises for every third response (counted in its worker)."""

    def __init__(self, task) -> None:
        super().__init__(task)
        self.n = 0

    def verdict(self, text, problem):
        self.n += 1
        if self.n % 3 == 0:
            raise RuntimeError("reward backend down")
        return self.task.verdict(text, problem)


class SometimesHangs(Wrapped):
    """Hangs on problems with target ``hang``, returns NaN for target ``nan``."""

    def __init__(self, task, hang: int, nan: int) -> None:
        super().__init__(task)
        self.hang, self.nan = hang, nan

    def verdict(self, text, problem):
        import math
        import time

        if problem.target == self.hang:
            time.sleep(600)
        return Verdict(math.nan if problem.target == self.nan else 1.0, "x", False)


def bad_reward(text: str, item: int):
    """A plain reward function that goes wrong in every way, by item: ok, NaN, inf, not a number, hangs,
    kills its worker."""
    import math
    import os
    import time

    kind = item % 6
    if kind == 0:
        return 1.0
    if kind == 1:
        return math.nan
    if kind == 2:
        return math.inf
    if kind == 3:
        return "1.0"
    if kind == 4:
        time.sleep(600)
    os._exit(3)


class HugeRewards(Wrapped):
    """Rewards at the edge of float32 by response: 1e308 (beyond float32: an error), +-3e38 (in range)."""

    def __init__(self, task) -> None:
        super().__init__(task)
        self.n = 0

    def verdict(self, text, problem):
        self.n += 1
        return Verdict((1e308, 3e38, -3e38, 0.0)[self.n % 4], "x", False)


def allocating_reward(text: str, item: int) -> float:
    """Holds ``item`` MiB for the duration of the call (a reward function that asks for too much memory)."""
    block = bytearray(item << 20)
    return float(len(block) > 0)
