"""Grids of subprocesses with one progress bar: the runner behind ``rspo study``, ``rspo drift`` and the demo.

Each job is a command that writes into its run directory; up to ``parallel`` run at once, each with one
torch thread, and the bar counts units (steps) over all of them with rate and ETA. A finished ``rspo
train`` run has ``done.json``; a started one without it is continued with ``--resume``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from rspo.config import load_config
from rspo.rundir import RunDir, steps_logged


@dataclass
class Job:
    """One subprocess of a grid: ``cmd`` writes into ``run``; progress is ``units`` (e.g. steps), of which
    ``progress()`` are done so far; ``finish()`` runs after a zero exit code (e.g. writes done.json)."""

    run: Path
    cmd: list[str]
    units: int
    progress: Callable[[], int]
    finish: Callable[[], None]


def advance(seen: dict[str, int], key: str, now: int) -> int:
    """New units of one job since last seen. A resumed run first drops the steps it logged after its last
    checkpoint (already counted as done), then logs them again: only steps beyond the most ever seen count."""
    new = max(now - seen[key], 0)
    seen[key] = max(seen[key], now)
    return new


def run_jobs(
    jobs: list[Job],
    parallel: int,
    desc: str,
    done_units: int = 0,
    total_units: int | None = None,
    progress: bool = True,
    postfix: Callable[[], dict[str, str]] | None = None,
) -> dict[str, str]:
    """Run ``jobs`` as subprocesses, ``parallel`` at a time, with one progress bar (rate and ETA over this
    call's units only: ``done_units`` of ``total_units`` count as done before; ``postfix()`` adds live
    values). Each job's output goes to ``RUN.log`` beside its directory. Returns {run: "done" | "failed (...)"}."""
    todo, status = list(jobs), {}
    total = total_units if total_units is not None else done_units + sum(j.units for j in jobs)
    bar = tqdm(total=total, initial=done_units, desc=desc, disable=not progress, unit="step")
    seen = {str(j.run): j.progress() for j in jobs}
    running: list[tuple[Job, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            job.run.parent.mkdir(parents=True, exist_ok=True)
            log = (job.run.parent / f"{job.run.name}.log").open("w")
            running.append((job, subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(1.0)
        if postfix is not None and progress:
            bar.set_postfix(postfix(), refresh=False)
        for item in list(running):
            job, proc = item
            bar.update(advance(seen, str(job.run), job.progress()))
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode == 0:
                    job.finish()
                    status[str(job.run)] = "done"
                else:
                    status[str(job.run)] = (
                        f"failed (exit {proc.returncode}; see {job.run.parent / (job.run.name + '.log')})"
                    )
                    tqdm.write(f"run {job.run} failed: {status[str(job.run)]}")
    bar.close()
    return status


def train_job(run: Path, base_config: str, overrides: list[str]) -> tuple[Job | None, int]:
    """The job of one ``rspo train`` run (None if it finished before) and its number of steps; the run's
    config is validated now. A run started before is continued (``--resume``: from its last checkpoint, or
    from step 0 if it had none)."""
    from rspo.train_config import TrainConfig

    steps = load_config(TrainConfig, base_config, overrides).steps
    if (run / "done.json").exists():
        return None, steps
    if RunDir.inspect(run) if run.is_dir() else None:
        cmd = [sys.executable, "-m", "rspo.cli", "train", "--resume", str(run)]
    else:
        cmd = [sys.executable, "-m", "rspo.cli", "train", base_config, *overrides]

    def finish() -> None:
        RunDir.existing(run, "train").write_json("done.json", {"steps": steps_logged(run)})

    return Job(run, cmd, steps, lambda: steps_logged(run), finish), steps
