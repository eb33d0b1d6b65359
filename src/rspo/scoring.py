"""Scoring responses with a reward function that may raise, return garbage, or hang.

    scored = score(texts, items, task, timeout_s=10.0, workers=1)   # .rewards, .reasons, .correct

``reward_fn`` is a task (an object with ``verdict(text, item)`` returning ``.reward``, ``.reason`` and
``.correct``, see :class:`rspo.tasks.Verdict`) or a plain callable ``reward_fn(text, item) -> float``,
whose response counts as correct when its reward is >= 1.

With ``timeout_s`` set (the default in the trainer and in evaluation), the calls run in a forked
worker process (``workers`` of them, responses interleaved): a call that does not return within
``timeout_s`` seconds is cut off by killing the worker's process group, counted as
``reward_timeout`` with reward 0, and a fresh worker scores the remaining responses. A call that
raises, returns something that is not a real number, NaN or inf, or kills its worker, gives reward
0 and reason ``reward_error``. Nothing the reward function does (hang, crash, exhaust memory,
change global state) reaches the caller's process; state it keeps does not come back either.
``timeout_s=None`` calls it in-process (no time bound; errors and non-finite values still caught).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import numbers
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

REWARD_ERROR, REWARD_TIMEOUT = "reward_error", "reward_timeout"


@dataclass
class Scored:
    """Rewards, reasons and correctness in input order, plus the first error message of each kind."""

    rewards: list[float]
    reasons: list[str]
    correct: list[bool]
    messages: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(r in (REWARD_ERROR, REWARD_TIMEOUT) for r in self.reasons)

    @property
    def timeouts(self) -> int:
        return sum(r == REWARD_TIMEOUT for r in self.reasons)


def _call(reward_fn: Any, text: str, item: Any) -> tuple[float, str, bool]:
    """One reward call, validated: (reward, reason, correct); raises on a reward that is not a finite real."""
    if hasattr(reward_fn, "verdict"):
        v = reward_fn.verdict(text, item)
        value, reason, correct = v.reward, v.reason, v.correct
    else:
        value = reward_fn(text, item)
        reason, correct = "ok", None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"the reward must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"the reward must be finite, got {value}")
    return value, str(reason), bool(value >= 1.0 if correct is None else correct)


def _score_one(reward_fn: Any, text: str, item: Any) -> tuple[float, str, bool, str | None]:
    try:
        return (*_call(reward_fn, text, item), None)
    except BaseException as e:  # a broken reward function must not stop a run (even sys.exit)
        return 0.0, REWARD_ERROR, False, f"{type(e).__name__}: {e}"[:500]


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the parent dies (a killed trainer leaves no scoring worker)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(conn: Connection, reward_fn: Any, texts: Sequence[str], items: Sequence[Any], todo: list[int]) -> None:
    os.setpgid(0, 0)  # its own process group: a timeout kills whatever it started too
    _die_with_parent()
    for i in todo:
        conn.send((i, *_score_one(reward_fn, texts[i], items[i])))
    conn.close()


class _Worker:
    def __init__(self, ctx, reward_fn, texts, items, todo: list[int], timeout_s: float) -> None:
        self.todo, self.timeout_s = todo, timeout_s
        recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_worker, args=(send, reward_fn, texts, items, todo), daemon=True)
        self.proc.start()
        send.close()
        self.conn = recv
        self.deadline = time.monotonic() + timeout_s

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and anything it started
        self.proc.kill()
        self.proc.join()
        self.conn.close()


def score(
    texts: Sequence[str],
    items: Sequence[Any],
    reward_fn: Callable | Any,
    *,
    timeout_s: float | None = 10.0,
    workers: int = 1,
) -> Scored:
    """Reward and reason of every response (see the module docstring for errors and timeouts)."""
    if len(texts) != len(items):
        raise ValueError(f"{len(texts)} responses but {len(items)} items to score them against")
    if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n = len(texts)
    out = Scored([0.0] * n, [""] * n, [False] * n)

    def record(i: int, r: float, why: str, ok: bool, msg: str | None) -> None:
        out.rewards[i], out.reasons[i], out.correct[i] = r, why, ok
        if msg is not None:
            out.messages.setdefault(why, msg)

    if timeout_s is None or n == 0:
        for i in range(n):
            record(i, *_score_one(reward_fn, texts[i], items[i]))
        return out
    # The tokenizers library warns in every forked child once its thread pool was used; the child
    # never tokenizes, and setting the variable explicitly silences it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = mp.get_context("fork")
    chunks = [list(range(k, n, workers)) for k in range(min(workers, n))]
    active = [_Worker(ctx, reward_fn, texts, items, c, timeout_s) for c in chunks]
    try:
        while active:
            now = time.monotonic()
            ready = wait([w.conn for w in active], timeout=max(0.0, min(w.deadline for w in active) - now))
            for w in list(active):
                restart: list[int] | None = None
                if w.conn in ready:
                    try:
                        i, *result = w.conn.recv()
                    except (EOFError, OSError):  # finished, or died inside the reward function
                        if w.todo:
                            record(w.todo[0], 0.0, REWARD_ERROR, False, "the reward function killed its worker")
                            restart = w.todo[1:]
                        w.kill()
                        active.remove(w)
                    else:
                        record(i, *result)
                        w.todo.pop(0)
                        w.deadline = time.monotonic() + timeout_s
                elif time.monotonic() >= w.deadline:
                    record(w.todo[0], 0.0, REWARD_TIMEOUT, False, f"no result within {timeout_s:g} s")
                    restart = w.todo[1:]
                    w.kill()
                    active.remove(w)
                if restart:
                    active.append(_Worker(ctx, reward_fn, texts, items, restart, timeout_s))
    finally:
        for w in active:
            w.kill()
    return out
