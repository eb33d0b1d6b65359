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
