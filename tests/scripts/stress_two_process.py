"""The two-process TRL run repeated under load (issue 21): every core kept busy by spinning processes.

    python tests/scripts/stress_two_process.py POLICY_DIR [--runs 20 --load 2]

Prints each run's exit code and time, then the number of failures; exits 1 if any run failed. Not part of
``make test`` (about 20 s a run); ``make stress-trl`` runs it with a freshly pretrained tiny policy.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "trl_two_process.py"


def spin() -> None:
    while True:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policy")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--load", type=int, default=2, help="spinning processes (default: one per core)")
    a = ap.parse_args()
    load = [mp.Process(target=spin, daemon=True) for _ in range(a.load)]
    for p in load:
        p.start()
    failures = 0
    try:
        for i in range(1, a.runs + 1):
            out = Path(tempfile.mkdtemp()) / "two.json"
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(free_port()),
                str(SCRIPT),
                a.policy,
                str(out),
            ]
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            ok = r.returncode == 0 and out.is_file()
            failures += not ok
            print(f"run {i}/{a.runs}: exit {r.returncode}, {time.time() - t0:.0f} s", flush=True)
            if not ok:
                print(r.stderr[-3000:], flush=True)
    finally:
        for p in load:
            p.terminate()
    print(f"{failures} failed of {a.runs} (load: {a.load} spinning processes)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
