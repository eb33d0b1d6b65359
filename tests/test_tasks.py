"""Tasks: the registry and options, user tasks and reward functions by import path, the math task's loaders
and grading (equivalent forms, hostile answers), the shipped data files, and the pass@k estimator."""

from __future__ import annotations

import itertools
import json
import math
import time

import pytest

from rspo.config import ConfigError, build
from rspo.evaluate import k_values, pass_at_k
from rspo.tasks import Verdict, list_tasks, make_task
from rspo.tasks.arithmetic import builtin_files
from rspo.tasks.files import DATA_DIR
from rspo.tasks.math import (
    MathExample,
    MathGrader,
    based_number,
    equation_sides,
    last_boxed,
    load_examples,
    normalize_answer,
)
from rspo.train_config import TrainConfig

SAMPLE = "builtin:math/sample-plain.jsonl"
SAMPLE_VERL = "builtin:math/sample-verl.jsonl"


# ----------------------------------------------------------------------------------------
# Registry, options, plug-ins
# ----------------------------------------------------------------------------------------
def test_registry_and_option_errors():
    assert list_tasks() == ["arithmetic", "code", "countdown", "math"]
    with pytest.raises(ConfigError, match=r"task.name='mathh' is not a task; valid: arithmetic, code, countdown, math"):
        make_task("mathh")
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['task.options.trian'\].* train, eval"):
        make_task("math", {"trian": [SAMPLE]})
    with pytest.raises(ConfigError, match=r"task.options.prompt_format='html' is not allowed.*'chat', 'text'"):
        make_task("math", {"prompt_format": "html"})
    with pytest.raises(ConfigError, match=r"data file 'nope.jsonl' does not exist"):
        build(TrainConfig, {"task": {"name": "math", "options": {"train": ["nope.jsonl"]}}})  # at build time
    with pytest.raises(ConfigError, match="split 'dev' is not a split of task 'countdown'; splits: validation, test"):
        make_task("countdown").eval_examples("dev")


def test_user_task_and_reward_function_by_import_path():
    task = make_task("tests.helpers:EchoTask")
    assert task.verdict("apple pie", "apple") == Verdict(1.0, "echoed", True)
    assert next(task.train_examples(1)) == "river"
    with pytest.raises(ConfigError, match="is not a subclass of rspo.tasks.Task"):
        make_task("tests.helpers:length_reward")
    with pytest.raises(ConfigError, match="cannot import 'no_such_pkg.mod'"):
        make_task("no_such_pkg.mod:Task")
    with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
        make_task("tests.helpers:Nope")
    math_task = make_task("math", {"eval": {"s": SAMPLE}, "reward_fn": "tests.helpers:length_reward"})
    ex = math_task.eval_examples("s")[0]
    assert math_task.verdict("ab", ex) == Verdict(1.0, "custom", True)
    assert math_task.verdict("abc", ex) == Verdict(0.0, "custom", False)
    with pytest.raises(ConfigError, match="reward_fn='tests.helpers:nothing'"):
        make_task("math", {"reward_fn": "tests.helpers:nothing"})


# ----------------------------------------------------------------------------------------
# Loading: verl and plain formats, JSONL and Parquet
# ----------------------------------------------------------------------------------------
def test_verl_and_plain_formats_give_the_same_examples(tmp_path):
    plain, verl = load_examples(SAMPLE), load_examples(SAMPLE_VERL)
    assert len(plain) == len(verl) == 36
    for a, b in zip(plain, verl, strict=True):
        assert (a.id, a.prompt, a.answer, a.solution) == (b.id, b.prompt, b.answer, b.solution)
    # answers given only as a solution come from its last \boxed{}
    ex = {e.id: e for e in plain}
    assert ex["sample-02"].answer == "5" and ex["sample-07"].answer == "x^2 + 4x + 4"
    text = load_examples(SAMPLE, prompt_format="text")[0]
    assert text.prompt.startswith("What is the sum") and text.prompt.endswith("\\boxed{}.\n")
    # Parquet, both formats
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    for name in ("sample-plain", "sample-verl"):
        rows = [json.loads(x) for x in (DATA_DIR / "math" / f"{name}.jsonl").read_text().splitlines()]
        keys = list(dict.fromkeys(k for r in rows for k in r))  # pyarrow infers columns from the first row only
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), tmp_path / f"{name}.parquet")
        got = load_examples(str(tmp_path / f"{name}.parquet"))
        assert [(e.prompt, e.answer) for e in got] == [(e.prompt, e.answer) for e in plain]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"question": "1+1?"}', r"bad.jsonl:2: needs 'answer'"),
        ('{"answer": "2"}', r"bad.jsonl:2: needs 'problem' or 'question'"),
        ('{"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "2"}}', r"bad.jsonl:2: verl format needs"),
        ('{"prompt": [{"role": "user", "content": "x"}], "reward_model": {}}', r"reward_model.ground_truth"),
        ("{not json", r"bad.jsonl:2: not a JSON line"),
        ('{"problem": "x", "solution": "no box here"}', r"the 'solution' has no \\boxed"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, match):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "1+1?", "answer": "2"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=match):
        load_examples(str(f))


def test_shipped_math_files_are_what_the_code_generates():
    for name, rows in builtin_files().items():
        shipped = [json.loads(x) for x in (DATA_DIR / "math" / name).read_text().splitlines()]
        assert shipped == rows, name
    arith = make_task("arithmetic")
    test_problems = {e.prompt[0]["content"] for e in arith.eval_examples("test")}
    stream = arith.train_examples(seed=0)
    assert not any(next(stream).prompt[0]["content"] in test_problems for _ in range(3000))


# ----------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------
def test_last_boxed():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unclosed {") is None  # a truncated response
    assert last_boxed("\\boxed{{a}{b}}") == "{a}{b}"
    # without braces TeX takes one token: MATH solutions write \boxed 5
    assert last_boxed("so the answer is $\\boxed 5$.") == "5"
    assert last_boxed("\\boxed5") == "5" and last_boxed("\\boxed \\pi") == "\\pi" and last_boxed("\\fbox\n7") == "7"
    assert last_boxed("\\boxed 42") == "4"  # one token, as TeX reads it (write \boxed{42})
    assert last_boxed("\\boxed{1} and \\boxed 2") == "2" and last_boxed("\\boxed 1 and \\boxed{2}") == "2"
    assert last_boxed("\\boxed{3} \\boxedsep") == "3"  # another command whose name starts with boxed
    assert last_boxed("ends in \\boxed") is None and last_boxed("\\boxed }") is None


EQUAL = [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("1/2", "\\frac{1}{2}"),
    ("0.50", "\\frac{1}{2}"),
    ("50\\%", "50"),
    ("25\\%", "25%"),
    ("(1, 2]", "(1,2]"),
    ("[2,6]", "[2, 6]"),
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("3,4", "\\{3,4\\}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("(x-3)(x+3)", "x^2-9"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("9\\pi", "9 \\pi"),
    ("1,000", "1000"),
    ("720^\\circ", "720"),
    ("\\text{(B)}", "B"),
    ("x = 5", "5"),
]
UNEQUAL = [
    ("3", "4"),
    ("\\frac{1}{3}", "0.33"),
    ("(1,2)", "[1,2]"),
    ("\\{1,2\\}", "\\{1,3\\}"),
    ("x^2", "2x"),
    ("-1", "1"),
    ("\\pi", "3.14"),
]


# Answers a policy could game the grader with (issue 21), each with the reason it is wrong.
GAMED = [
    ("6 = 5", "5", "a false equation: its sides disagree, so taking the last side would reward a hedge"),
    ("1 = 2 = 3 = 4 = 5", "5", "a chain of false equations ending in the truth"),
    ("5 = 6", "5", "a false equation starting with the truth"),
    ("x = 4 = 5", "5", "an assignment followed by a false equation"),
    ("x = y = 5", "5", "two variables: not a plain assignment"),
    ("2x = 10", "5", "an equation to solve, not an answer"),
    ("\\frac{x^2-25}{x-5} - x", "5", "a free variable left in the answer to a number (sympy cancels it)"),
    ("\\frac{5x}{x}", "5", "a free variable left in the answer to a number"),
    ("5 + 0x", "5", "a free variable left in the answer to a number"),
    ("1011_3", "1011_2", "a subscript base is part of the value: 31 is not 11"),
    ("2112_4", "2112_3", "a subscript base is part of the value: 150 is not 68"),
    ("1011_2", "11", "the truth read in the answer's base 2 is 3, not 11"),
    ("13_8", "1011_2", "the same number in another base: the base is part of the answer"),
    ("1021", "1011_2", "not a base-2 numeral"),
]
# What stays correct next to those rules.
GAME_FREE = [
    ("x = 5", "5", "a plain assignment counts as its value"),
    ("n_1 = 5", "5", "a plain assignment to a subscripted variable"),
    ("\\theta = \\frac{\\pi}{2}", "\\pi/2", "a plain assignment to a Greek variable"),
    ("2 + 3 = 5", "5", "the sides agree"),
    ("x = 2 + 3 = 5", "5", "an assignment whose remaining sides agree"),
    ("y = 2x + 3", "y = 2x+3", "an equation for an equation truth (math-verify's comparison)"),
    ("1011_2", "1011_{2}", "the same base written two ways"),
    ("(1011)_2", "1011_2", "parentheses around the digits"),
    ("1011", "1011_2", "a bare numeral is read in the truth's base"),
    ("FF_{16}", "255_{10}", None),
    ("5_{10}", "5", "base 10 written out"),
    ("3\\sqrt{2}", "\\sqrt{18}", "no variable: constants and roots"),
    ("x + 1", "1 + x", "variables on both sides"),
    ("5 \\text{ cm}", "5", "a unit in text is not a variable"),
]


@pytest.mark.parametrize(("answer", "truth", "why"), GAMED, ids=[g[0] for g in GAMED])
def test_gamed_answers_are_wrong(answer, truth, why):
    assert not MathGrader().correct(answer, truth), why


@pytest.mark.parametrize(("answer", "truth", "why"), GAME_FREE, ids=[g[0] for g in GAME_FREE])
def test_answers_next_to_the_gaming_rules_stay_judged(answer, truth, why):
    if why is None:  # the same number in different bases
        assert not MathGrader().correct(answer, truth)
    else:
        assert MathGrader().correct(answer, truth), why


def test_equation_sides_and_bases():
    assert equation_sides("1 = 2 = 3") == ["1 ", " 2 ", " 3"]
    assert equation_sides("x \\leq 3") == ["x \\leq 3"] and equation_sides("x <= 3, y >= 2, z != 1") == [
        "x <= 3, y >= 2, z != 1"
    ]
    assert equation_sides("\\{x : x = 1\\}") == ["\\{x : x = 1\\}"]  # inside braces: not the answer's equation
    assert equation_sides("f(x=1) = 2") == ["f(x=1) ", " 2"]
    assert based_number("1011_2") == ("1011", 2) and based_number("(FF)_{16}") == ("FF", 16)
    assert based_number("x_{10}") is None and based_number("a_2") is None  # variables with subscripts
    assert based_number("12_2") is None and based_number("1_1") is None  # a digit the base lacks, base 1
    g = MathGrader(use_math_verify=False)  # the rules do not depend on math-verify
    assert not g.correct("1011_3", "1011_2") and g.correct("1011", "1011_2") and not g.correct("6 = 5", "5")
    assert g.correct("x = 5", "5")


def test_unbraced_box_is_graded():
    task = make_task("math", {"eval": {"s": SAMPLE}})
    five = MathExample("t", "What is 2 + 3?", "5")
    assert task.verdict("so $\\boxed 5$.", five) == Verdict(1.0, "correct", True)  # was no_answer
    assert task.verdict("so $\\boxed 6$.", five) == Verdict(0.0, "wrong_answer", False)


@pytest.mark.parametrize(("answer", "truth"), EQUAL)
def test_equivalent_forms_are_correct(answer, truth):
    assert MathGrader().correct(answer, truth)


@pytest.mark.parametrize(("answer", "truth"), UNEQUAL)
def test_different_answers_are_wrong(answer, truth):
    assert not MathGrader().correct(answer, truth)


def test_string_grader_and_normal_form():
    g = MathGrader(use_math_verify=False)
    assert g.correct("\\dfrac{3}{4}", "\\frac{3}{4}") and g.correct("$5$.", "5") and g.correct("50\\%", "50")
    assert not g.correct("0.5", "\\frac{1}{2}")  # no algebra without math-verify
    assert normalize_answer("\\left( 1, 2 \\right)") == "(1,2)"


def test_verdicts_of_the_math_task():
    task = make_task("math", {"eval": {"s": SAMPLE}})
    ex = {e.id: e for e in task.eval_examples("s")}
    half = ex["sample-01"]  # 18/24 = 3/4
    assert task.verdict("so the answer is \\boxed{\\dfrac{3}{4}}", half) == Verdict(1.0, "correct", True)
    assert task.verdict("\\boxed{0.75}", half).correct
    assert task.verdict("\\boxed{1} no wait \\boxed{\\frac34}", half).correct  # the last boxed answer counts
    assert task.verdict("\\boxed{3/4} no wait \\boxed{1}", half) == Verdict(0.0, "wrong_answer", False)
    assert task.verdict("the answer is 3/4", half) == Verdict(0.0, "no_answer", False)
    assert task.verdict("\\boxed{3/4", half).reason == "no_answer"  # unbalanced: truncated


@pytest.mark.parametrize(
    "answer",
    [
        "2^{10^{10}}",
        "10^{100000000}",
        "\\frac{" * 400 + "1" + "}{2}" * 400,
        "(" * 3000 + "1" + ")" * 3000,
        "1+" * 400_000 + "1",
        "x" * 2_000_000,
        "\\sqrt{" * 300 + "2" + "}" * 300,
    ],
    ids=["huge-exponent", "huger-exponent", "deep-fractions", "deep-parens", "long-sum", "long-string", "deep-roots"],
)
def test_hostile_answers_are_bounded_in_time(answer):
    task = make_task("math", {"eval": {"s": SAMPLE}, "verify_timeout_s": 1})
    ex = task.eval_examples("s")[0]
    t0 = time.perf_counter()
    v = task.verdict(f"\\boxed{{{answer}}}", ex)
    assert time.perf_counter() - t0 < 8  # math-verify's own limits (1 s per parse / comparison) hold
    assert v.reward == 0.0 and not v.correct


# ----------------------------------------------------------------------------------------
# pass@k
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_brute_force_over_subsets(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert k_values(8) == [1, 2, 4, 8] and k_values(6) == [1, 2, 4, 6] and k_values(1) == [1]
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    assert math.isclose(pass_at_k(32, 1, 1), 1 / 32)
