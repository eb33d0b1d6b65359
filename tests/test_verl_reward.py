"""rspo's tasks as verl's reward function and data (issue 23): ``rspo verl-data`` writes verl parquet files whose
ground truth ``compute_score`` reads back, dispatching on ``data_source`` to Countdown, the math grader and the
code sandbox, each verdict in a scoring worker process."""

from __future__ import annotations

import json
import threading

import pyarrow.parquet as pq
import pytest

from rspo.cli import main
from rspo.errors import ConfigError
from rspo.integrations.verl_reward import compute_score
from rspo.tasks import make_task
from rspo.tasks.files import DATA_DIR


def rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def score(row: dict, response: str, **kw) -> dict:
    return compute_score(row["data_source"], response, row["reward_model"]["ground_truth"], row["extra_info"], **kw)


def test_countdown_files_round_trip_through_compute_score(tmp_path):
    out = tmp_path / "cd"
    assert (
        main(["verl-data", "task.name=countdown", "train_size=6", "splits=[validation]", "limit=5", f"out_dir={out}"])
        == 0
    )
    train, val = rows(out / "train.parquet"), rows(out / "validation.parquet")
    assert len(train) == 6 and len(val) == 5
    task = make_task("countdown")
    stream = task.train_examples(0)
    for row in train:  # the training stream in order: the solver's reference scores 1, a wrong sum 0.1
        ex = next(stream)
        assert row["data_source"] == "rspo/countdown" and row["prompt"] == [
            {"role": "user", "content": task.prompt(ex)}
        ]
        assert score(row, task.reference(ex)) == {"score": 1.0, "acc": 1.0, "reason": "correct"}
        assert score(row, "<answer>1+1</answer>")["reason"] in ("wrong_numbers", "wrong_value")
    assert [r["reward_model"]["ground_truth"]["target"] for r in val] == [
        p.target for p in task.eval_examples("validation")[:5]
    ]
    assert main(["verl-data", "task.name=countdown", "train_size=6", f"out_dir={out}"]) == 2  # no silent overwrite


def test_math_uses_rspo_grader_and_names_unknown_sources(tmp_path):
    sample = "builtin:math/sample-plain.jsonl"
    out = tmp_path / "m"
    assert main(["verl-data", "task.name=math", f"task.options.eval.s={sample}", "train_size=0", f"out_dir={out}"]) == 0
    (row, *_rest) = rows(out / "s.parquet")
    truth = row["reward_model"]["ground_truth"]
    assert score(row, f"so \\boxed{{{truth}}}")["acc"] == 1.0
    assert score(row, f"\\boxed{{6 = {truth}}}")["acc"] == 0.0  # the grading contract holds in verl too
    with pytest.raises(ConfigError, match="data_source 'openai/gsm8k' is not one of rspo's"):
        compute_score("openai/gsm8k", "\\boxed{5}", "5", {})
    assert compute_score("openai/gsm8k", "\\boxed{5}", "5", {}, default_task="math")["score"] == 1.0
    assert compute_score("openai/gsm8k", "\\boxed{5}", ["5"], None, default_task="math")["score"] == 1.0


def test_code_runs_in_the_sandbox(tmp_path):
    out = tmp_path / "c"
    sample = "builtin:code/sample.jsonl"
    assert (
        main(
            [
                "verl-data",
                "task.name=code",
                f"task.options.eval.s={sample}",
                "train_size=0",
                "limit=3",
                f"out_dir={out}",
            ]
        )
        == 0
    )
    src = {json.loads(x)["id"]: json.loads(x) for x in (DATA_DIR / "code" / "sample.jsonl").read_text().splitlines()}
    task = make_task("code", {"eval": {"s": sample}})
    for row, ex in zip(rows(out / "s.parquet"), task.eval_examples("s")[:3], strict=True):
        good, bad = (f"```python\n{src[ex.id][k]}\n```" for k in ("solution", "wrong"))
        assert score(row, good) == {"score": 1.0, "acc": 1.0, "reason": "passed"}
        assert score(row, bad)["reason"] == "wrong_answer"
    verl_spec = json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})  # the form verl's code datasets use
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert compute_score("rspo/code", good, verl_spec, {})["reason"] == "passed"


def test_hostile_answers_and_threads_are_bounded():
    """verl scores from executor threads: every thread gets its own scoring worker; a hanging or huge answer
    is cut off there (reward 0), never in verl's process."""
    results = {}

    def call(i: int) -> None:
        results[i] = compute_score("rspo/math", f"\\boxed{{{i}}}", str(i), {}, timeout_s=30)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i]["acc"] == 1.0 for i in range(3))
    out = compute_score("rspo/math", "\\boxed{2^{10^{12}}}", "5", {}, timeout_s=2)
    assert out["score"] == 0.0 and out["reason"] in ("reward_timeout", "wrong_answer", "reward_error")


# ------------------------------------------------------------------------------------- the verl recipe
def test_recipe_snippets_are_the_commands_the_end_to_end_test_runs():
    """docs/verl-recipe.md includes docs/snippets/verl-{cpu,paper}.sh; they are rendered from
    tests/verl_e2e/recipe.py, whose cpu command `make test-verl-e2e` runs (refresh: recipe.py --write-docs)."""
    from tests.verl_e2e import recipe

    page = (recipe.ROOT / "docs" / "verl-recipe.md").read_text()
    for name, render in recipe.SNIPPETS.items():
        assert (recipe.DOCS / name).read_text() == render(), (
            f"{name} is stale: python tests/verl_e2e/recipe.py --write-docs"
        )
        assert f'--8<-- "docs/snippets/{name}"' in page


@pytest.mark.parametrize("which", ["cpu", "paper"])
def test_recipe_rspo_keys_parse(which):
    from rspo.integrations.verl import VerlRSPOConfig
    from tests.verl_e2e import recipe

    cmd = recipe.cpu_command() if which == "cpu" else recipe.paper_command()
    prefix = "+actor_rollout_ref.rspo."
    keys = dict(a[len(prefix) :].split("=", 1) for a in cmd.argv if a.startswith(prefix))
    assert keys["objective"] == "rspo"
    cfg = VerlRSPOConfig(**{k: float(v) if k == "gamma_min" else v for k, v in keys.items()})
    assert cfg.shift.gamma_min == 0.5 and cfg.shift.placement == "after_clip"


def test_recipe_parses_verls_console_metrics():
    from tests.verl_e2e.recipe import parse_metrics

    log = (
        "(TaskRunnerV1 pid=1) step:2 - actor/pg_loss:-0.125 - actor/router/gamma_mean:0.99 - "
        "training/rollout_probs_diff_max:1.1e-06 - timing_s/step:5.5\n(TaskRunnerV1 pid=1) other line\n"
    )
    assert parse_metrics(log) == {
        2: {
            "actor/pg_loss": -0.125,
            "actor/router/gamma_mean": 0.99,
            "training/rollout_probs_diff_max": 1.1e-06,
            "timing_s/step": 5.5,
        }
    }
