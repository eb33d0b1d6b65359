"""Scoring responses with a reward function that may raise, return garbage, or hang.

    with Scorer(task, timeout_s=10.0, workers=1) as scorer:      # workers start once, on first use
        scored = scorer.score(texts, examples)                    # .rewards, .reasons, .correct

``reward_fn`` is a task (an object with ``verdict(text, item)`` returning ``.reward``, ``.reason`` and
``.correct``, see :class:`rspo.tasks.Verdict`) or a plain callable ``reward_fn(text, item) -> float``,
whose response counts as correct when its reward is >= 1.

With ``timeout_s`` set (the trainer's and evaluation's default), the calls run in worker processes
(``workers`` of them, responses interleaved), each started once as a fresh interpreter with its own
copy of the reward function (pickled: define it in an importable module). A call that does not return within
``timeout_s`` seconds is cut off by killing the worker's process group, counted as ``reward_timeout``
with reward 0, and a new worker scores the remaining responses. A call that raises, returns something
that is not a real number, NaN or inf, or kills its worker, gives reward 0 and reason ``reward_error``.
Nothing the reward function does (hang, crash, exhaust memory, change global state) reaches the
caller's process. (Workers are fresh processes, not forks of the trainer: a fork per step made the trainer pay a
copy-on-write fault on every page it wrote afterwards, 13% of an update here.)
``timeout_s=None`` calls it in-process (no time bound; errors and non-finite values still caught).

Memory: a reward function may keep memory per distinct input (sympy's cache holds a 26 MB integer for
each distinct ``2^{50000000+i}``, and freed heap is rarely returned to the system). A worker whose
resident memory is above ``max_rss_mb`` after a call is replaced by a fresh one, which scores the
responses still to do: no verdict is lost, and ``Scored.recycled`` counts the replacements (the trainer
logs ``reward/worker_recycles``, and the time shows in ``time/score``). A worker's address space is
limited to twice that (a soft ``RLIMIT_AS``), so one call that asks for more gets a MemoryError
(``reward_error``) instead of growing until the machine kills the run. Resident memory is read from
``/proc`` (Linux); elsewhere only the address-space limit applies.

A reward is a float64 that the trainer stores in float32: a finite reward beyond float32's range
(``1e308``) would become inf and NaN downstream, so it is a ``reward_error`` like a non-finite one.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from rspo.errors import ConfigError, FieldError

REWARD_ERROR, REWARD_TIMEOUT = "reward_error", "reward_timeout"
FLOAT32_MAX = 3.4028234663852886e38
"""Rewards are stored as float32: a larger magnitude is an error, not an overflow to inf."""


@dataclass
class Scored:
    """Rewards, reasons and correctness in input order, plus the first error message of each kind."""

    rewards: list[float]
    reasons: list[str]
    correct: list[bool]
    messages: dict[str, str] = field(default_factory=dict)
    recycled: int = 0
    """Workers replaced because their resident memory went above ``max_rss_mb``."""

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
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"the reward {value:g} is beyond float32's range (rewards are stored as float32)")
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


def _limit_address_space(mb: int) -> None:
    """A soft RLIMIT_AS of ``mb`` MiB (soft: a sandbox the reward function starts may set its own)."""
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    except (ImportError, ValueError, OSError):
        pass


def _serve(fd: int, address_space_mb: int = 0) -> None:
    """A worker (``python -c`` in a fresh interpreter): loads the reward function sent first, then receives
    jobs [(index, text, item), ...] and sends one (index, reward, reason, correct, message) per response."""
    _die_with_parent()
    if address_space_mb > 0:
        _limit_address_space(address_space_mb)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    conn = Connection(fd)
    try:
        reward_fn = pickle.loads(conn.recv_bytes())
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"[:500]))
        return
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        for i, text, item in job:
            conn.send((i, *_score_one(reward_fn, text, item)))


STARTUP_S = 300.0
"""How long a new worker may take to start (a fresh interpreter importing the task's modules)."""
_WORKER = "import sys; from rspo.scoring import _serve; _serve(int(sys.argv[1]), int(sys.argv[2]))"


def rss_mb(pid: int) -> float | None:
    """Resident memory of process ``pid`` in MiB (from /proc; None where there is none)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class _Worker:
    """A scoring process: a fresh interpreter (never a fork of the trainer, never importing its main module),
    in its own session (a timeout kills its whole process group), talking over a socket pair."""

    def __init__(self, payload: bytes, address_space_mb: int = 0) -> None:
        mine, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the caller's imports work
        cmd = [sys.executable, "-c", _WORKER, str(theirs.fileno()), str(address_space_mb)]
        self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], env=env, start_new_session=True)
        theirs.close()
        self.conn = Connection(mine.detach())
        self.todo: list[int] = []
        self.deadline = math.inf
        try:  # ready before the clock of its first call starts
            self.conn.send_bytes(payload)
            status, msg = self.conn.recv() if self.conn.poll(STARTUP_S) else ("error", f"no start in {STARTUP_S:g} s")
        except (EOFError, OSError):
            status, msg = "error", f"exited with code {self.proc.poll()} while starting"
        if status != "ready":
            self.kill()
            raise ConfigError(f"a scoring worker could not load the reward function: {msg}")

    def send(self, todo: list[int], texts: Sequence[str], items: Sequence[Any], timeout_s: float) -> None:
        self.todo = list(todo)
        self.conn.send([(i, texts[i], items[i]) for i in todo])
        self.deadline = time.monotonic() + timeout_s

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and anything it started
        self.proc.wait()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        try:
            self.proc.wait(timeout=5)
            self.conn.close()
        except subprocess.TimeoutExpired:
            self.kill()


MAX_RSS_MB = 1024.0
"""Default resident-memory ceiling of a scoring worker, MiB (a fresh one is 30-70 MiB)."""
MIN_RSS_MB = 128.0


class Scorer:
    """Scores responses with ``reward_fn`` in persistent worker processes (see the module docstring)."""

    def __init__(
        self,
        reward_fn: Callable | Any,
        *,
        timeout_s: float | None = 10.0,
        workers: int = 1,
        max_rss_mb: float | None = MAX_RSS_MB,
    ) -> None:
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_rss_mb is not None and not max_rss_mb >= MIN_RSS_MB:
            raise ValueError(f"max_rss_mb must be >= {MIN_RSS_MB} (a fresh worker's size) or None, got {max_rss_mb}")
        self.reward_fn, self.timeout_s, self.workers = reward_fn, timeout_s, workers
        self.max_rss_mb = max_rss_mb
        self._address_space_mb = 0 if max_rss_mb is None else int(2 * max_rss_mb)
        self._payload: bytes | None = None
        self._pool: list[_Worker] = []

    def _payload_bytes(self) -> bytes:
        if self._payload is None:
            try:
                self._payload = pickle.dumps(self.reward_fn)
            except Exception as e:
                raise ConfigError(
                    f"the reward function {type(self.reward_fn).__name__} cannot be sent to a scoring worker "
                    f"({type(e).__name__}: {e}); define it (and what it holds) at module level, or set "
                    f"scoring.timeout_s=null to score in-process without a time limit"
                ) from None
        return self._payload

    def score(self, texts: Sequence[str], items: Sequence[Any]) -> Scored:
        if len(texts) != len(items):
            raise ValueError(f"{len(texts)} responses but {len(items)} items to score them against")
        n = len(texts)
        out = Scored([0.0] * n, [""] * n, [False] * n)

        def record(i: int, r: float, why: str, ok: bool, msg: str | None) -> None:
            out.rewards[i], out.reasons[i], out.correct[i] = r, why, ok
            if msg is not None:
                out.messages.setdefault(why, msg)

        if self.timeout_s is None or n == 0:
            for i in range(n):
                record(i, *_score_one(self.reward_fn, texts[i], items[i]))
            return out
        payload = self._payload_bytes()
        while len(self._pool) < min(self.workers, n):
            self._pool.append(self._new_worker(payload))
        busy = []
        for k, w in enumerate(self._pool[: min(self.workers, n)]):
            w.send(list(range(k, n, self.workers)), texts, items, self.timeout_s)
            busy.append(w)
        while busy:
            wait([w.conn for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for w in list(busy):
                rest: list[int] | None = None
                if w.conn.poll():  # a result is waiting (even if the clock ran out meanwhile), or the worker died
                    try:
                        i, *result = w.conn.recv()
                    except (EOFError, OSError):  # the worker died inside the reward function
                        record(w.todo[0], 0.0, REWARD_ERROR, False, "the reward function killed its worker")
                        rest = w.todo[1:]
                    else:
                        record(i, *result)
                        w.todo.remove(i)
                        w.deadline = time.monotonic() + self.timeout_s
                        if self._too_big(w):  # replaced now; what it had left goes to a fresh worker
                            out.recycled += 1
                            rest = w.todo
                        elif not w.todo:
                            busy.remove(w)
                elif time.monotonic() >= w.deadline:
                    record(w.todo[0], 0.0, REWARD_TIMEOUT, False, f"no result within {self.timeout_s:g} s")
                    rest = w.todo[1:]
                if rest is not None:  # replace the worker; the remaining responses go to the new one
                    w.kill()
                    if w in busy:
                        busy.remove(w)
                    self._pool.remove(w)
                    if rest:
                        fresh = self._new_worker(payload)
                        self._pool.append(fresh)
                        fresh.send(rest, texts, items, self.timeout_s)
                        busy.append(fresh)
        return out

    def _new_worker(self, payload: bytes) -> _Worker:
        return _Worker(payload, self._address_space_mb)

    def _too_big(self, w: _Worker) -> bool:
        if self.max_rss_mb is None:
            return False
        rss = rss_mb(w.proc.pid)
        return rss is not None and rss > self.max_rss_mb

    def close(self) -> None:
        for w in self._pool:
            w.stop()
        self._pool = []

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


@dataclass
class ScoringConfig:
    """The ``scoring`` section of ``rspo train`` and ``rspo eval``: the reward calls' time and memory bounds."""

    timeout_s: float | None = 10.0
    """Seconds one reward call may take: calls run in a scoring worker process that is killed after this
    (reward 0, counted in reward/timeouts); null = call in-process without a time bound."""
    workers: int = 1
    """Scoring worker processes (responses interleaved); more helps slow verifiers."""
    max_rss_mb: float | None = 1024.0
    """A worker whose resident memory is above this (MiB) after a call is replaced by a fresh one (no verdict
    lost; counted in reward/worker_recycles); its address space is capped at twice this; null = no limit."""

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise FieldError("timeout_s", f"must be > 0 (or null), got {self.timeout_s}")
        if self.workers < 1:
            raise FieldError("workers", f"must be >= 1, got {self.workers}")
        if self.max_rss_mb is not None and self.max_rss_mb < MIN_RSS_MB:
            raise FieldError("max_rss_mb", f"must be >= {MIN_RSS_MB:g} (or null), got {self.max_rss_mb}")

    def scorer(self, reward_fn: Callable | Any) -> Scorer:
        """A :class:`Scorer` of ``reward_fn`` with these bounds."""
        return Scorer(reward_fn, timeout_s=self.timeout_s, workers=self.workers, max_rss_mb=self.max_rss_mb)


def score(
    texts: Sequence[str],
    items: Sequence[Any],
    reward_fn: Callable | Any,
    *,
    timeout_s: float | None = 10.0,
    workers: int = 1,
    max_rss_mb: float | None = MAX_RSS_MB,
) -> Scored:
    """One-off scoring (workers started and stopped for this call; a trainer keeps a :class:`Scorer`)."""
    with Scorer(reward_fn, timeout_s=timeout_s, workers=workers, max_rss_mb=max_rss_mb) as s:
        return s.score(texts, items)
