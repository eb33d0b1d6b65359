"""Scoring code responses in the sandbox: 256 responses x 5 tests each, serial against parallel, side by side.

Each response is a correct program for a stdin/stdout problem with five tests (so every test runs: the
all-or-nothing grader stops at the first failure). Reports the wall time with ``parallel=1`` and with
``parallel=N`` (default: the number of cores), alternating, and the speedup.

    python benchmarks/code_scoring.py [--responses 256 --parallel 2 --pairs 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from rspo.sandbox import isolation
from rspo.scoring import Scorer
from rspo.tasks import make_task
from rspo.tasks.code import CodeExample

TESTS = [
    {"kind": "stdio", "input": f"{a} {b}\n", "output": f"{a + b}\n"}
    for a, b in ((1, 2), (3, 4), (-5, 5), (100, 250), (7, 0))
]
PROGRAM = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


def run(parallel: int, n: int) -> float:
    task = make_task("code", {"parallel": parallel, "wall_s": 5.0})
    examples = [CodeExample(f"ex{i}", "a b -> a + b", TESTS) for i in range(n)]
    with Scorer(task, timeout_s=120) as scorer:
        scorer.score([PROGRAM], examples[:1])  # start the worker before the clock
        t0 = time.perf_counter()
        out = scorer.score([PROGRAM] * n, examples)
        dt = time.perf_counter() - t0
    assert all(out.correct), out.reasons[:5]
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", type=int, default=256)
    ap.add_argument("--parallel", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pairs", type=int, default=2)
    a = ap.parse_args()
    print(
        f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores; {a.responses} responses x {len(TESTS)} "
        f"tests; isolation: {'; '.join(isolation()[3:]) or 'rlimits only'}"
    )
    serial, par = [], []
    for i in range(a.pairs):
        serial.append(run(1, a.responses))
        par.append(run(a.parallel, a.responses))
        print(
            f"pair {i + 1}: serial {serial[-1]:.1f} s   parallel={a.parallel} {par[-1]:.1f} s   "
            f"speedup {serial[-1] / par[-1]:.2f}"
        )
    n_runs = a.responses * len(TESTS)
    print(
        f"median: serial {statistics.median(serial):.1f} s ({statistics.median(serial) / n_runs * 1000:.0f} ms per "
        f"program run), parallel {statistics.median(par):.1f} s, speedup "
        f"{statistics.median(s / p for s, p in zip(serial, par, strict=True)):.2f}"
    )


if __name__ == "__main__":
    main()
