"""A scoring worker's resident memory over hostile answers, with and without the ceiling, side by side.

Math: distinct huge powers ``\\boxed{2^{50000000+i}}`` (the issue-21 case: sympy keeps about 26 MB per
distinct answer). Code: hostile programs (output floods, memory bombs, CPU loops, distinct programs).
The resident memory of every worker is sampled every 5 ms; prints the peak and the end value, the
replacements, the verdicts (none may be lost) and the scoring time of each setting.

    python benchmarks/scorer_memory.py [--math 60 --code 200 --ceiling 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

from rspo.scoring import Scorer, rss_mb
from rspo.tasks import make_task

HOSTILE_PROGRAMS = [
    "print('x' * 10_000_000)",
    "a = bytearray(2_000_000_000)",
    "import sys; sys.stdout.write('y' * 200_000); print(input())",
    "raise SystemExit(3)",
    "print(sum(range({i})))",
]


def measure(task, texts, items, ceiling: float | None, workers: int = 1) -> dict:
    peak, stop = [0.0], threading.Event()
    with Scorer(task, timeout_s=60, workers=workers, max_rss_mb=ceiling) as scorer:
        scorer.score(texts[:1], items[:1])  # the worker is up before the clock

        def sample() -> None:
            while not stop.is_set():
                for w in list(scorer._pool):
                    peak[0] = max(peak[0], rss_mb(w.proc.pid) or 0.0)
                time.sleep(0.005)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        out = scorer.score(texts, items)
        dt = time.perf_counter() - t0
        end = max((rss_mb(w.proc.pid) or 0.0) for w in scorer._pool) if scorer._pool else 0.0
        stop.set()
        th.join()
    lost = sum(r == "" for r in out.reasons)
    reasons = sorted(set(out.reasons))
    return {"peak": peak[0], "end": end, "recycled": out.recycled, "lost": lost, "seconds": dt, "reasons": reasons}


def row(label: str, r: dict) -> str:
    cells = [label, f"{r['peak']:.0f} MB", f"{r['end']:.0f} MB", r["recycled"], r["lost"], f"{r['seconds']:.1f} s"]
    return "| " + " | ".join(map(str, [*cells, ", ".join(r["reasons"])])) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--math", type=int, default=60, help="hostile math answers")
    ap.add_argument("--code", type=int, default=200, help="hostile programs")
    ap.add_argument("--ceiling", type=float, default=512.0, help="max_rss_mb of the bounded setting")
    a = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print("| setting | peak RSS | end RSS | replaced | verdicts lost | time | reasons |\n|---|---|---|---|---|---|---|")
    math_task = make_task("math", {"eval": {"s": "builtin:math/sample-plain.jsonl"}})
    ex = math_task.eval_examples("s")[0]
    texts = [f"\\boxed{{2^{{{50_000_000 + i}}}}}" for i in range(a.math)]
    for ceiling in (None, a.ceiling):
        label = f"math, {a.math} x 2^(5e7+i), max_rss_mb={ceiling}"
        print(row(label, measure(math_task, texts, [ex] * len(texts), ceiling)), flush=True)
    code_task = make_task("code", {"eval": {"s": "builtin:code/sample.jsonl"}, "wall_s": 1.0, "cpu_s": 1})
    cx = next(e for e in code_task.eval_examples("s") if e.tests[0]["kind"] == "stdio")
    cx.tests = cx.tests[:1]
    progs = [HOSTILE_PROGRAMS[i % len(HOSTILE_PROGRAMS)].format(i=i) for i in range(a.code)]
    texts = [f"```python\n{p}\n# {i}\n```" for i, p in enumerate(progs)]
    for ceiling in (None, a.ceiling):
        label = f"code, {a.code} hostile programs, max_rss_mb={ceiling}"
        print(row(label, measure(code_task, texts, [cx] * len(texts), ceiling)), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
