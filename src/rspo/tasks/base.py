"""The task interface: what the trainer and evaluation need from a verifiable task.

A task yields training examples (an endless seeded stream), named evaluation splits, the prompt of
an example (plain text, or chat messages that the policy's tokenizer renders with its chat
template), and a verdict per response: a reward, a reason from the task's own vocabulary, and
``correct`` (what pass@k counts). It also says how long a response may be and where generation stops.

Tasks are registered by name (:func:`register_task`) and built from ``task.name`` + ``task.options``
(:func:`make_task`); ``task.name`` may also be an import path ``my_pkg.my_module:MyTask``. Options are
a dataclass per task (``Task.Options``), validated like every config section: an unknown option or a
wrong type is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rspo.errors import ConfigError
from rspo.prompts import Prompt


@dataclass(frozen=True)
class Verdict:
    """The outcome of scoring one response: reward, the task's reason, and whether it is correct."""

    reward: float
    reason: str
    correct: bool


@dataclass
class NoOptions:
    """A task without options."""


class Task:
    """Base class of verifiable tasks. Subclasses set ``name``, ``reasons``, ``Options`` and implement the
    four methods below; ``max_new_tokens`` and ``stop_strings`` may come from the options."""

    name: ClassVar[str] = ""
    reasons: ClassVar[tuple[str, ...]] = ()
    """Every reason :meth:`verdict` can return (the scorer adds reward_error and reward_timeout)."""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    # ---------------------------------------------------------------- generation
    @property
    def max_new_tokens(self) -> int:
        """Response length limit used by rollouts and evaluation (unless a config overrides it)."""
        return int(getattr(self.options, "max_new_tokens", 512))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Generation also stops after any of these strings (which stay in the response)."""
        return tuple(getattr(self.options, "stop_strings", ()) or ())

    # ---------------------------------------------------------------- data
    def train_examples(self, seed: int) -> Iterator[Any]:
        """An endless, seeded stream of training examples (the same seed gives the same stream)."""
        raise NotImplementedError

    def eval_splits(self) -> list[str]:
        """Names of the evaluation splits, the default (periodic validation) first."""
        raise NotImplementedError

    def eval_examples(self, split: str) -> list[Any]:
        """The examples of evaluation split ``split`` (an unknown name is an error listing the valid ones)."""
        raise NotImplementedError

    def prompt(self, example: Any) -> Prompt:
        """The prompt of ``example``: plain text, used as it is, or chat messages
        ``[{"role": ..., "content": ...}]``, which the policy renders with its tokenizer's chat template
        (:func:`rspo.prompts.render_prompt`; rendering belongs to the tokenizer, not the task)."""
        raise NotImplementedError

    def verdict(self, response: str, example: Any) -> Verdict:
        """Score one response (the decoded text, special tokens removed): a reward, a reason from
        :attr:`reasons`, and whether it is correct (what pass@k counts). It runs in a scoring worker
        process with a time and memory bound; it may raise (counted as ``reward_error``), and it must never
        execute the response in this process (the code task runs it in a sandbox)."""
        raise NotImplementedError

    def group(self, example: Any) -> str | None:
        """A label that splits an evaluation's accuracy by kind of example (Countdown: the number count), or
        None (the default) for no split. Evaluation records carry it as ``group``."""
        return None

    def reference(self, example: Any) -> str | None:
        """A reference response to train on (``rspo pretrain``), or None if the task has none."""
        return None

    def references(self, seed: int) -> Iterator[tuple[Prompt, str]]:
        """(prompt, reference response) pairs from the training stream, for supervised pretraining."""
        for ex in self.train_examples(seed):
            ref = self.reference(ex)
            if ref is None:
                raise ConfigError(
                    f"task {self.name!r} gives no reference response for {self.record(ex)}: "
                    "rspo pretrain needs one for every training example"
                )
            yield self.prompt(ex), ref

    def record(self, example: Any) -> dict[str, Any]:
        """JSON-safe fields of ``example`` for the response files of evaluation."""
        if dataclasses.is_dataclass(example):
            return dataclasses.asdict(example)
        return example if isinstance(example, dict) else {"example": repr(example)}

    def unknown_split(self, split: str) -> ConfigError:
        return ConfigError(
            f"split {split!r} is not a split of task {self.name!r}; splits: {', '.join(self.eval_splits())}"
        )


class FileTask(Task):
    """A task whose examples come from data files: ``options.train`` (a list of files) and ``options.eval``
    (split name -> file), read by :meth:`load`. Training examples are every train file's examples, in a new
    seeded order each epoch; evaluation splits are read on first use."""

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._train: list[Any] = [e for path in self.options.train for e in self.load(path)]
        self._eval: dict[str, list[Any]] = {}

    def load(self, path: str) -> list[Any]:
        """The examples of one data file (with the task's instruction and prompt format)."""
        raise NotImplementedError

    def train_examples(self, seed: int) -> Iterator[Any]:
        import random

        if not self._train:
            raise ConfigError(f"task {self.name} has no training data: set task.options.train")
        rng = random.Random(f"{self.name}/train/{seed}")
        while True:  # epochs, each in its own seeded order
            order = list(range(len(self._train)))
            rng.shuffle(order)
            for i in order:
                yield self._train[i]

    def train_set(self) -> list[Any]:
        """Every training example once, in file order (for engines that take a dataset, e.g. TRL)."""
        return list(self._train)

    def eval_splits(self) -> list[str]:
        return list(self.options.eval)

    def eval_examples(self, split: str) -> list[Any]:
        if split not in self.options.eval:
            raise self.unknown_split(split)
        if split not in self._eval:
            self._eval[split] = self.load(self.options.eval[split])
        return self._eval[split]

    def prompt(self, example: Any) -> Prompt:
        return example.prompt


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register ``cls`` under ``cls.name`` (a duplicate name is an error)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _TASKS:
        raise ValueError(f"task {cls.name!r} is already registered")
    _TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    """The registered task names, sorted (independent of import order)."""
    return sorted(_TASKS)


def import_object(path: str, what: str) -> Any:
    """``pkg.module:attr`` imported; ConfigError naming ``what`` if it cannot be."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ConfigError(f"{what}={path!r} must be an import path like my_pkg.my_module:Name")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{what}={path!r}: cannot import {module!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what}={path!r}: {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def task_class(name: str) -> type[Task]:
    """The task class registered as ``name``, or imported from ``pkg.module:Class``."""
    if ":" in name:
        cls = import_object(name, "task.name")
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ConfigError(f"task.name={name!r} is not a subclass of rspo.tasks.Task")
        return cls
    if name not in _TASKS:
        valid = ", ".join(list_tasks())
        raise ConfigError(f"task.name={name!r} is not a task; valid: {valid} (or pkg.module:TaskClass)")
    return _TASKS[name]


def task_options(name: str, options: dict[str, Any] | None) -> Any:
    """The validated options dataclass of task ``name`` (errors name ``task.options.<field>``)."""
    from rspo.config import build

    return build(task_class(name).Options, dict(options or {}), where="task.options")


def make_task(name: str, options: dict[str, Any] | Any = None) -> Task:
    """Task ``name`` with ``options`` (a mapping, validated, or an options dataclass)."""
    cls = task_class(name)
    opts = options if isinstance(options, cls.Options) else task_options(name, options)
    return cls(opts)


@dataclass
class TaskConfig:
    name: str = "countdown"
    """Task: countdown | math | arithmetic, or an import path pkg.module:TaskClass (a rspo.tasks.Task)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The task's options, e.g. {train: [data.parquet], eval: {aime24: aime24.jsonl}} for math; an unknown
    option is an error listing the valid ones (`rspo tasks` lists every task's options)."""

    def __post_init__(self) -> None:
        self.parsed = task_options(self.name, self.options)  # validated now; the task is built when it is used

    def build(self) -> Task:
        """The task with these options."""
        return make_task(self.name, self.parsed)

    @property
    def max_new_tokens(self) -> int:
        return int(getattr(self.parsed, "max_new_tokens", 512))
