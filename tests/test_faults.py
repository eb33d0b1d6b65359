"""Faults a user meets (issue 21): hostile answers that grow a scoring worker, rewards beyond float32, bad
inputs that got through (a zero length, a checkpoint without a tokenizer), misspelled config fields, and
runs that must be bit-identical when repeated on one machine."""

from __future__ import annotations

import math
import shutil
import threading
import time

import pytest

from rspo.assets import policy_dir
from rspo.config import ConfigError, build, load_config
from rspo.rundir import read_metrics
from rspo.scoring import Scorer, rss_mb
from rspo.tasks import make_task
from rspo.train_config import TrainConfig
from rspo.trainer import Trainer
from tests.test_reliability import cli, one_error_line
from tests.test_trainer import TIMING, tiny_cfg


class PeakRSS:
    """Samples the resident memory of every worker of a scorer every few milliseconds: the measured peak."""

    def __init__(self, scorer: Scorer, every_s: float = 0.005) -> None:
        self.scorer, self.every_s, self.peak = scorer, every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for w in list(self.scorer._pool):
                self.peak = max(self.peak, rss_mb(w.proc.pid) or 0.0)
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------------
# Scoring workers: memory bounded over any number of hostile answers
# ----------------------------------------------------------------------------------------
def test_math_worker_memory_is_bounded_over_hundreds_of_hostile_answers():
    """200 distinct huge powers: sympy keeps about 2.6 MB for each (26 MB at 2^(5e7)), so one worker grew to
    64 + 200 x 2.6 = 580 MB before; with a 160 MB ceiling it is replaced and no verdict is lost."""
    task = make_task("math", {"eval": {"s": "builtin:math/sample-plain.jsonl"}})
    ex = task.eval_examples("s")[0]
    limit = 160.0
    texts = [f"\\boxed{{2^{{{5_000_000 + i}}}}}" for i in range(200)]
    with Scorer(task, timeout_s=20, workers=1, max_rss_mb=limit) as scorer, PeakRSS(scorer) as peak:
        recycled, reasons = 0, []
        for k in range(0, len(texts), 40):  # five steps of 40 responses
            out = scorer.score(texts[k : k + 40], [ex] * 40)
            recycled += out.recycled
            reasons += out.reasons
    assert reasons == ["wrong_answer"] * 200  # every verdict, none lost to a replacement
    assert recycled >= 2
    assert peak.peak < limit + 20, peak.peak  # the ceiling plus one answer's growth (about 3 MB)
    assert peak.peak > 100  # the sampler saw the worker grow (the bound is measured, not vacuous)


def test_math_worker_without_a_ceiling_grows():
    """The same answers without the ceiling: the growth the bound prevents (40 answers, kept short)."""
    task = make_task("math", {"eval": {"s": "builtin:math/sample-plain.jsonl"}})
    ex = task.eval_examples("s")[0]
    with Scorer(task, timeout_s=20, workers=1, max_rss_mb=None) as scorer:
        scorer.score(["\\boxed{1}"], [ex])
        before = rss_mb(scorer._pool[0].proc.pid)
        out = scorer.score([f"\\boxed{{2^{{{5_000_000 + i}}}}}" for i in range(40)], [ex] * 40)
        after = rss_mb(scorer._pool[0].proc.pid)
    assert out.recycled == 0 and after - before > 60, (before, after)


HOSTILE_PROGRAMS = [
    "print('x' * 10_000_000)",  # beyond the output cap
    "a = bytearray(2_000_000_000)",  # beyond the memory limit
    "import sys; sys.stdout.write('y' * 200_000); print(input())",  # near the cap
    "while True: pass",  # CPU limit
    "raise SystemExit(3)",
    "print(sum(range({i})))",  # distinct programs, correct shape
]


def test_code_worker_memory_is_bounded_over_hundreds_of_hostile_programs():
    task = make_task("code", {"eval": {"s": "builtin:code/sample.jsonl"}, "wall_s": 1.0, "cpu_s": 1, "parallel": 2})
    ex = next(e for e in task.eval_examples("s") if e.tests[0]["kind"] == "stdio")
    ex.tests = ex.tests[:1]
    programs = [HOSTILE_PROGRAMS[i % 6].format(i=i) for i in range(237)]
    programs = [p for i, p in enumerate(programs) if "while True" not in p or i < 24]  # 4 timeouts are enough
    texts = [f"```python\n{p}\n# {i}\n```" for i, p in enumerate(programs)]
    with Scorer(task, timeout_s=30, workers=2) as scorer, PeakRSS(scorer) as peak:  # 100 programs per worker
        out = scorer.score(texts, [ex] * len(texts))
        end = max(rss_mb(w.proc.pid) for w in scorer._pool)
    assert len(texts) >= 200 and out.errors == 0 and "" not in out.reasons
    assert {"wrong_answer", "runtime_error", "timeout"} <= set(out.reasons), set(out.reasons)
    assert peak.peak < 120 and end < 120, (peak.peak, end)  # 30 MB fresh: nothing accumulates per program


def test_a_call_that_asks_for_too_much_memory_is_a_reward_error():
    from tests.helpers import allocating_reward

    with Scorer(allocating_reward, timeout_s=30, workers=1, max_rss_mb=256) as scorer:
        out = scorer.score(["a", "b", "c"], [8, 4096, 8])  # 4 GiB is beyond the 512 MiB address space
    assert out.reasons == ["ok", "reward_error", "ok"] and out.rewards == [1.0, 0.0, 1.0]
    assert "MemoryError" in out.messages["reward_error"]


def test_scorer_ceiling_is_validated():
    with pytest.raises(ValueError, match="max_rss_mb must be >= 128"):
        Scorer(len, max_rss_mb=10)
    with pytest.raises(ConfigError, match="scoring.max_rss_mb: must be >= 128"):
        build(TrainConfig, {"scoring": {"max_rss_mb": 64}})


# ----------------------------------------------------------------------------------------
# Rewards beyond float32
# ----------------------------------------------------------------------------------------
def test_reward_beyond_float32_is_a_reward_error_and_no_metric_is_nan(tiny_policy, tmp_path):
    from tests.helpers import HugeRewards

    tr = Trainer(tiny_cfg(tiny_policy, tmp_path / "r", steps=2), progress=False)
    tr.task = HugeRewards(tr.task)
    tr.train()
    rows = read_metrics(tmp_path / "r")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # 16 responses: 4 at 1e308 (errors), 8 at +-3e38 (in float32's range), 4 at 0
        assert row["reward/errors"] == 4
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        assert not bad, bad
        assert row["train/nonfinite_loss"] == 0


def test_float64_reward_beyond_float32_is_named():
    from rspo.scoring import score

    out = score(["x", "y"], [0, 1], lambda t, i: (1e308, 1.0)[i], timeout_s=None)
    assert out.reasons == ["reward_error", "ok"] and "beyond float32's range" in out.messages["reward_error"]


# ----------------------------------------------------------------------------------------
# Bad input that got through
# ----------------------------------------------------------------------------------------
def test_zero_lengths_are_errors_not_defaults():
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens must be >= 1 \(or null for the task's\), got 0"):
        load_config(TrainConfig, None, ["rollout.max_new_tokens=0"])
    with pytest.raises(ConfigError, match=r"objective.norm_length: must be > 0"):
        load_config(
            TrainConfig,
            None,
            ["objective.name=grpo", "objective.loss_agg=seq-mean-token-sum-norm", "objective.norm_length=0"],
        )
    assert load_config(TrainConfig, None, ["rollout.max_new_tokens=null"]).max_new_tokens == 32  # the task's


def test_checkpoint_without_tokenizer_is_one_line_and_writes_nothing(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(policy_dir("countdown-e64k8"), ckpt)
    for f in ckpt.glob("tokenizer*"):
        f.unlink()
    out = tmp_path / "run"
    r = cli("train", f"model={ckpt}", f"out_dir={out}", "steps=1")
    assert r.returncode == 2
    line = one_error_line(r.stderr, "train")
    assert "has no tokenizer" in line and str(ckpt) in line, line
    assert not out.exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # another model's (larger) tokenizer
        shutil.copy(policy_dir("math-tiny-base") / name, ckpt / name)
    r = cli("train", f"model={ckpt}", f"out_dir={out}", "steps=1")
    assert r.returncode == 2 and not out.exists()
    assert "has 512 tokens but the model embeds only 25" in one_error_line(r.stderr, "train")


def test_misspelled_fields_suggest_the_nearest_dotted_name(tmp_path):
    def message(cls, overrides):
        with pytest.raises(ConfigError) as e:
            load_config(cls, None, overrides)
        return str(e.value)

    assert "did you mean optim.lr?" in message(TrainConfig, ["lr=1e-3"])
    assert "did you mean router_shift.gamma_min?" in message(TrainConfig, ["router_shift.gama_min=0.2"])
    assert "did you mean rollout.group_size?" in message(TrainConfig, ["rollout.groupsize=4"])
    assert "did you mean objective?" in message(TrainConfig, ["objectiv.name=grpo"])
    assert "did you mean optim.lr for lr, seed for seeed?" in message(TrainConfig, ["lr=1", "seeed=2"])
    assert "did you mean" not in message(TrainConfig, ["zzz=1"])
    r = cli("train", "lr=1e-3", f"out_dir={tmp_path / 'x'}")  # the command line says it too
    assert r.returncode == 2 and "did you mean optim.lr?" in one_error_line(r.stderr, "train")
    from rspo.lab.pretrain import PretrainConfig

    assert "did you mean" in message(PretrainConfig, ["stepz=3"])


# ----------------------------------------------------------------------------------------
# One machine: the same run twice is bit-identical
# ----------------------------------------------------------------------------------------
def test_the_same_run_twice_is_bit_identical(tiny_policy, tmp_path):
    """What the demo's table rests on: on one machine a run is a function of its config (metrics and weights
    equal bit for bit); across machines the floating-point order of the CPU's kernels differs."""
    over = {"steps": 3, "eval_every": 3, "eval_problems": 8, "objective__name": "rspo"}
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        Trainer(tiny_cfg(tiny_policy, run, **over), progress=False).train()
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]  # noqa: E731
    a, b = (strip(read_metrics(r)) for r in runs)
    assert a == b and len(a) == 4
    assert (runs[0] / "checkpoint" / "model.safetensors").read_bytes() == (
        runs[1] / "checkpoint" / "model.safetensors"
    ).read_bytes()
