"""rspo's tasks as verl's reward function and data: ``compute_score`` and ``rspo verl-data``.

In verl's config, one entry gives a run rspo's graders (Countdown, the math grader of ``docs/grading.md``,
code through rspo's sandbox)::

    custom_reward_function.path=pkg://rspo.integrations.verl_reward custom_reward_function.name=compute_score

verl calls ``compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)`` per
response, in threads of its reward workers. The task is chosen by ``data_source`` (:data:`DATA_SOURCES`;
``reward_kwargs.default_task`` for other sources, else an error naming the source). Each verdict runs in a
scoring worker process of rspo (:mod:`rspo.scoring`: a time limit, a memory ceiling, errors counted as
reward 0), one per calling thread: model output never runs in verl's process, and math-verify's time limits
work (they need a main thread, which verl's executor threads are not). The result is verl's dict form:
``score`` (the reward), ``acc`` (correct, 0/1) and ``reason``.

``rspo verl-data task.name=countdown out_dir=data/countdown`` writes a task's splits as verl parquet files
(``train.parquet`` from the training stream, one file per evaluation split) with the ground truth this
module reads back.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rspo.errors import ConfigError, FieldError
from rspo.scoring import Scorer
from rspo.tasks import Task, TaskConfig, make_task

PREFIX = "rspo/"


# ----------------------------------------------------------------------------------------
# Ground truth in verl's rows: each task's codec
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Codec:
    """How one task's examples travel through verl: ``ground_truth(example)`` for
    ``reward_model.ground_truth``, and ``example(ground_truth, extra_info)`` back."""

    ground_truth: Callable[[Any], Any]
    example: Callable[[Any, dict], Any]


def _countdown_truth(ex: Any) -> dict:
    return {"numbers": list(ex.numbers), "target": int(ex.target)}


def _countdown_example(gt: Any, extra: dict) -> Any:
    from rspo.tasks.countdown import Problem

    if not (isinstance(gt, dict) and {"numbers", "target"} <= set(gt)):
        raise ValueError(f"countdown ground_truth must be {{numbers, target}}, got {gt!r}"[:300])
    return Problem(tuple(int(n) for n in gt["numbers"]), int(gt["target"]))


def _math_example(gt: Any, extra: dict) -> Any:
    from rspo.tasks.math import MathExample

    gt = gt[0] if isinstance(gt, (list, tuple)) and len(gt) == 1 else gt
    if not isinstance(gt, (str, int, float)):
        raise ValueError(f"math ground_truth must be a string or number, got {type(gt).__name__}")
    return MathExample(str(extra.get("index", "verl")), "", str(gt))


def _code_truth(ex: Any) -> str:
    return json.dumps({"tests": ex.tests})


def _code_example(gt: Any, extra: dict) -> Any:
    from rspo.tasks.code import CodeExample, _tests

    spec = json.loads(gt) if isinstance(gt, str) else gt
    tests = spec["tests"] if isinstance(spec, dict) and "tests" in spec else _tests({"input_output": spec}, "verl")
    return CodeExample(str(extra.get("index", "verl")), "", tests)


CODECS: dict[str, Codec] = {
    "countdown": Codec(_countdown_truth, _countdown_example),
    "math": Codec(lambda ex: ex.answer, _math_example),
    "arithmetic": Codec(lambda ex: ex.answer, _math_example),
    "code": Codec(_code_truth, _code_example),
}
DATA_SOURCES = {"rspo/countdown": "countdown", "rspo/math": "math", "rspo/arithmetic": "math", "rspo/code": "code"}
"""data_source -> task. ``rspo verl-data`` writes ``rspo/<task>``."""


def task_of(data_source: str, default_task: str | None) -> str:
    """The task that scores ``data_source`` (errors name it and the known sources)."""
    task = DATA_SOURCES.get(data_source, default_task)
    if task is None:
        raise ConfigError(
            f"data_source {data_source!r} is not one of rspo's ({', '.join(DATA_SOURCES)}); set "
            f"custom_reward_function.reward_kwargs.default_task=math (or code, countdown) to score it anyway"
        )
    if task not in CODECS:
        raise ConfigError(f"default_task={task!r}; valid: {', '.join(CODECS)}")
    return task


# ----------------------------------------------------------------------------------------
# compute_score
# ----------------------------------------------------------------------------------------
class _Verdicts:
    """Scores one response of a task through the task's own verdict, in a worker process of rspo."""

    def __init__(self, task: Task, timeout_s: float, max_rss_mb: float) -> None:
        self.task = task
        self.scorer = Scorer(task, timeout_s=timeout_s, workers=1, max_rss_mb=max_rss_mb)

    def __call__(self, text: str, example: Any) -> dict[str, Any]:
        out = self.scorer.score([text], [example])
        return {"score": out.rewards[0], "acc": float(out.correct[0]), "reason": out.reasons[0]}


_local = threading.local()


def _verdicts(task: str, options: dict, timeout_s: float, max_rss_mb: float) -> _Verdicts:
    key = (task, json.dumps(options, sort_keys=True), timeout_s, max_rss_mb)
    cache = getattr(_local, "verdicts", None)
    if cache is None:
        cache = _local.verdicts = {}
    if key not in cache:  # one scoring worker per thread and task: verl scores from several threads
        cache[key] = _Verdicts(make_task(task, options), timeout_s, max_rss_mb)
    return cache[key]


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    *,
    default_task: str | None = None,
    task_options: dict[str, dict] | None = None,
    timeout_s: float = 10.0,
    max_rss_mb: float = 1024.0,
    **kwargs: Any,
) -> dict[str, Any]:
    """verl's reward-function contract (see the module docstring). ``task_options``: per task, its options
    (e.g. ``{"math": {"verify_timeout_s": 5}, "code": {"wall_s": 4}}``); ``timeout_s`` and ``max_rss_mb``:
    the scoring worker's bounds. verl's extra keyword arguments (a reward model's address) are not used."""
    task = task_of(data_source, default_task)
    example = CODECS[task].example(ground_truth, dict(extra_info or {}))
    options = dict((task_options or {}).get(task, {}))
    return _verdicts(task, options, timeout_s, max_rss_mb)(solution_str, example)


# ----------------------------------------------------------------------------------------
# rspo verl-data
# ----------------------------------------------------------------------------------------
@dataclass
class VerlDataConfig:
    """``rspo verl-data``: a task's splits as verl parquet files."""

    task: TaskConfig = field(default_factory=TaskConfig)
    """The task and its options (countdown, math, arithmetic or code)."""
    train_size: int = 1024
    """Examples of the training stream written to train.parquet (0: no training file)."""
    seed: int = 0
    """Seed of the training stream."""
    splits: list[str] = field(default_factory=list)
    """Evaluation splits written as SPLIT.parquet; [] = every split of the task."""
    limit: int | None = None
    """At most this many examples per evaluation split."""
    out_dir: str = "data/verl"
    """Directory of the parquet files (a new, empty or earlier verl-data directory)."""

    def __post_init__(self) -> None:
        if self.task.name not in CODECS:
            raise FieldError("task", f"{self.task.name!r} has no verl format here; valid: {', '.join(CODECS)}")
        if self.train_size < 0:
            raise FieldError("train_size", f"must be >= 0, got {self.train_size}")
        if self.limit is not None and self.limit < 1:
            raise FieldError("limit", f"must be >= 1 (or null), got {self.limit}")


def verl_row(task: Task, example: Any, index: int, split: str) -> dict[str, Any]:
    """One example as a verl row: the prompt as chat messages, the ground truth, ``data_source`` rspo/<task>."""
    prompt = task.prompt(example)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return {
        "data_source": PREFIX + task.name,
        "prompt": messages,
        "ability": task.name,
        "reward_model": {"style": "rule", "ground_truth": CODECS[task.name].ground_truth(example)},
        "extra_info": {"index": index, "split": split},
    }


def write_verl_data(cfg: VerlDataConfig, overwrite: bool = False) -> dict[str, Path]:
    """Write the files (see :class:`VerlDataConfig`); returns {name: path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rspo.rundir import RunDir

    task = cfg.task.build()
    splits = cfg.splits or task.eval_splits()
    tables: dict[str, list[dict]] = {}
    if cfg.train_size:
        stream = task.train_examples(cfg.seed)
        tables["train"] = [verl_row(task, next(stream), i, "train") for i in range(cfg.train_size)]
    for split in splits:
        examples = task.eval_examples(split)[: cfg.limit]
        tables[split] = [verl_row(task, ex, i, split) for i, ex in enumerate(examples)]
    run = RunDir.open_run(cfg.out_dir, "verl-data", overwrite=overwrite)
    try:
        out = {}
        for name, rows in tables.items():
            path = run.claim(f"{name}.parquet")
            pq.write_table(pa.Table.from_pylist(rows), path)
            out[name] = path
        return out
    finally:
        run.close()
