"""``rspo study``: a resumable grid of ``rspo train`` runs (arm x seed); the report is :mod:`rspo.lab.report`.

    rspo study configs/study-countdown.yaml           # finished runs are skipped, interrupted ones resume
    rspo report runs/study-countdown                   # report.md + PNG figures in the study directory

Each run is a subprocess (``python -m rspo.cli train ...``) with one torch thread; up to
``parallel`` run at once (:mod:`rspo.lab.jobs`). A finished run has ``done.json``; a started one without
it is continued with ``--resume`` (from its last checkpoint, or from step 0 if it had none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rspo.lab.jobs import run_jobs, train_job
from rspo.rundir import RunDir, steps_logged


@dataclass
class StudyConfig:
    base_config: str = "configs/demo.yaml"
    """Train config (YAML) every run starts from."""
    out_dir: str = "runs/study"
    """Study directory: one sub-directory per arm, one per seed inside."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of every arm."""
    common: list[str] = field(default_factory=list)
    """Overrides applied to every run (dotted field=value)."""
    arms: dict[str, list[str]] = field(default_factory=dict)
    """Arm name -> overrides (e.g. rspo: [objective.name=rspo])."""
    parallel: int = 2
    """Runs at once (default: the number of cores), one torch thread each."""
    order: str = "arm"
    """Run order: 'arm' (every seed of the first arm, then the next arm) or 'seed' (interleaved: every arm's
    seed 0, then every arm's seed 1, ...), so a study stopped early has paired seeds in every arm."""
    accuracy_levels: list[float] = field(default_factory=lambda: [0.35, 0.40])
    """Validation accuracies for the steps-to-reach column of the report."""
    collapse_drop: float = 0.5
    """Collapse rule for the report: final validation accuracy below (1 - collapse_drop) x the best."""
    reference_dir: str | None = None
    """Another study directory whose ``reference_arms`` the report shows next to these arms (same
    base config and common overrides required), e.g. ablations against the main arms."""
    reference_arms: list[str] = field(default_factory=list)
    """Arms of ``reference_dir`` to show (labelled ``<arm> (ref)``)."""
    compare: list[str] = field(default_factory=list)
    """Pairs ``"arm - baseline"`` (``<arm> (ref)`` for a reference arm) for the report's table of
    differences, paired by seed; empty = every pair of this study's arms."""

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("study.arms is empty")
        if not self.seeds or self.parallel < 1:
            raise ValueError("study.seeds must be non-empty and parallel >= 1")
        bad = [a for a in self.arms if not a.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"arm names must be letters, digits, - and _: {bad}")
        if bool(self.reference_dir) != bool(self.reference_arms):
            raise ValueError("study.reference_dir and study.reference_arms go together (both set or neither)")
        for pair in self.compare:
            if len(pair.split(" - ")) != 2:
                raise ValueError(f"study.compare: {pair!r} is not 'arm - baseline'")
        if self.order not in ("arm", "seed"):
            raise ValueError(f"study.order must be 'arm' or 'seed', got {self.order!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds has repeated seeds: {self.seeds}")
        if not all(0 <= a <= 1 for a in self.accuracy_levels):
            raise ValueError(f"study.accuracy_levels must lie in [0, 1], got {self.accuracy_levels}")
        if not 0 < self.collapse_drop < 1:
            raise ValueError(f"study.collapse_drop must be in (0, 1), got {self.collapse_drop}")


def run_dirs(cfg: StudyConfig) -> list[tuple[str, int, Path]]:
    """(arm, seed, run directory) in the study's run order."""
    pairs = [(a, s) for a in cfg.arms for s in cfg.seeds]
    if cfg.order == "seed":
        pairs = [(a, s) for s in cfg.seeds for a in cfg.arms]
    return [(arm, seed, Path(cfg.out_dir) / arm / f"seed{seed}") for arm, seed in pairs]


def run_study(cfg: StudyConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the grid; returns {run_dir: status}."""
    jobs, status, total_steps = [], {}, 0
    for arm, seed, run in run_dirs(cfg):
        job, steps = train_job(
            run, cfg.base_config, [*cfg.common, *cfg.arms[arm], f"seed={seed}", f"out_dir={run}", "threads=1"]
        )
        total_steps += steps
        if job is None:
            status[str(run)] = "done (skipped)"
        else:
            jobs.append(job)
    study = RunDir.open_or_create(cfg.out_dir, "study")  # only after every run's config was validated
    study.write_config(cfg, "study.yaml")
    for arm in cfg.arms:
        study.claim(arm)
    done = sum(steps_logged(r) for _, _, r in run_dirs(cfg))  # counted as done: rate and ETA are this call's
    status |= run_jobs(jobs, cfg.parallel, f"study ({len(jobs)} runs to go)", done, total_steps, progress)
    return status
