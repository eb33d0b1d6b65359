"""Countdown: generator, exact solver, verifier (hostile strings included), reward rules, splits, tokenizer."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rspo.lab.tokenizer import build_char_tokenizer
from rspo.tasks.countdown import (
    DATA_DIR,
    CountdownReward,
    CountdownSpec,
    CountdownSplits,
    ParseError,
    Problem,
    evaluate_expression,
    extract_answer,
    format_answer,
    generate,
    load_problems,
    make_prompt,
    numbers_used,
    reachable_targets,
    solve,
)


# ---------------------------------------------------------------------------------------- solver
def brute_force_values(numbers: tuple[int, ...]) -> set[Fraction]:
    """Independent oracle: every RPN program using each number once (all orders, all op strings)."""
    ops = "+-*/"
    out = set()
    n = len(numbers)
    for perm in set(itertools.permutations(numbers)):
        for opseq in itertools.product(ops, repeat=n - 1):
            # all valid RPN shapes: positions of the n-1 operators among the 2n-1 slots
            for shape in itertools.combinations(range(1, 2 * n - 1), n - 1):
                stack, nums, opi, ok = [], iter(perm), iter(opseq), True
                for i in range(2 * n - 1):
                    if i in shape:
                        if len(stack) < 2:
                            ok = False
                            break
                        b, a = stack.pop(), stack.pop()
                        o = next(opi)
                        if o == "/" and b == 0:
                            ok = False
                            break
                        stack.append(a + b if o == "+" else a - b if o == "-" else a * b if o == "*" else a / b)
                    else:
                        stack.append(Fraction(next(nums)))
                if ok and len(stack) == 1:
                    out.add(stack[0])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_solver_is_exhaustive_against_brute_force(seed):
    rng = random.Random(seed)
    numbers = tuple(rng.randint(1, 12) for _ in range(3 if seed < 3 else 4))
    oracle = {int(v) for v in brute_force_values(numbers) if v.denominator == 1 and 1 <= v <= 60}
    assert set(reachable_targets(numbers, 1, 60)) == oracle
    for t in range(1, 61):
        expr = solve(numbers, t)
        assert (expr is not None) == (t in oracle)
        if expr is not None:
            assert evaluate_expression(expr) == t and sorted(numbers_used(expr)) == sorted(numbers)


def test_solver_hand_cases():
    assert solve((1, 2, 3), 7) is not None  # 1+2*3
    assert solve((3, 3, 8, 8), 24) is not None  # 8/(3-8/3): needs a non-integer intermediate
    assert evaluate_expression(solve((3, 3, 8, 8), 24)) == 24
    assert solve((1, 1, 1), 50) is None
    assert solve((5, 7), 2) == "7-5"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=2, max_size=4), st.integers(1, 99))
def test_solver_solutions_always_verify(numbers, target):
    expr = solve(numbers, target)
    if expr is not None:
        p = Problem(tuple(numbers), target)
        assert CountdownReward().verdict(format_answer(expr), p).reason == "correct"


# ---------------------------------------------------------------------------------------- generator
def test_generator_seeded_and_solvable():
    spec = CountdownSpec()
    a = [generate(spec, random.Random(5)) for _ in range(3)]
    b = [generate(spec, random.Random(5)) for _ in range(3)]
    assert a == b
    rng = random.Random(1)
    for _ in range(50):
        p = generate(spec, rng)
        assert 3 <= len(p.numbers) <= 4 and all(1 <= x <= 99 for x in p.numbers) and 1 <= p.target <= 99
        assert solve(p.numbers, p.target) is not None
    unsolvable = CountdownSpec(solvable_only=False, min_count=3, max_count=3, max_target=999)
    draws = [generate(unsolvable, rng) for _ in range(40)]
    assert any(solve(p.numbers, p.target) is None for p in draws)  # without the option, some are not
    with pytest.raises(ValueError, match="min_count"):
        CountdownSpec(min_count=5, max_count=4)


def test_splits_fixed_disjoint_and_shipped_files_match_generation():
    splits = CountdownSplits()
    assert len(splits.test) == 1000 and len(splits.validation) == 500
    test_keys = {p.key for p in splits.test}
    val_keys = {p.key for p in splits.validation}
    assert len(test_keys) == 1000 and len(val_keys) == 500 and not test_keys & val_keys
    stream = splits.train_stream(seed=0, targets_per_draw=4)
    train = [next(stream) for _ in range(3000)]
    assert not {p.key for p in train} & (test_keys | val_keys)
    assert {len(p.numbers) for p in splits.test} == {3, 4}
    # the shipped files are exactly what the generator produces from the split seeds
    regenerated = CountdownSplits.__new__(CountdownSplits)
    regenerated.spec, regenerated.n_validation, regenerated.n_test, regenerated.seed = CountdownSpec(), 500, 1000, 0
    regenerated.generate()
    assert regenerated.test == load_problems(DATA_DIR / "countdown-test.jsonl")
    assert regenerated.validation == load_problems(DATA_DIR / "countdown-validation.jsonl")
    other = CountdownSplits(n_validation=20, n_test=30, seed=7)  # non-default: generated, not loaded
    assert len(other.test) == 30 and other.test != splits.test[:30]


def test_load_problems_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"numbers": [1, 2], "target": 3}\n{"numbers": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a Countdown problem"):
        load_problems(f)


# ---------------------------------------------------------------------------------------- reward rules
P = Problem((3, 5, 7), 22)  # 3*5+7


@pytest.mark.parametrize(
    ("response", "reward", "reason"),
    [
        ("<answer>3*5+7</answer>", 1.0, "correct"),
        ("<answer> ( 3 * 5 ) + 7 </answer>", 1.0, "correct"),
        ("<answer>7+5*3</answer>", 1.0, "correct"),
        ("<answer>3+5+7</answer>", 0.1, "wrong_value"),
        ("<answer>3*5+7+1</answer>", 0.1, "wrong_numbers"),
        ("<answer>3*5</answer>", 0.1, "wrong_numbers"),
        ("<answer>7/(5-5)+3</answer>", 0.1, "wrong_numbers"),
        ("<answer>3/(5-5)*7</answer>", 0.1, "wrong_numbers"),
        ("no tags here 3*5+7", 0.0, "no_answer"),
        ("<answer>3*5+7", 0.0, "no_answer"),
        ("<answer>three</answer>", 0.0, "unparsable"),
        ("<answer></answer>", 0.0, "unparsable"),
        ("<answer>3+5+7</answer> then <answer>3*5+7</answer>", 1.0, "correct"),  # the last tag counts
        ("<answer>3*5+7</answer> then <answer>3+5+7</answer>", 0.1, "wrong_value"),
    ],
)
def test_reward_rules(response, reward, reason):
    v = CountdownReward().verdict(response, P)
    assert (v.reward, v.reason) == (reward, reason)


def test_division_by_zero_is_wrong_not_a_crash():
    p = Problem((3, 5, 5), 1)
    v = CountdownReward().verdict("<answer>3/(5-5)</answer>", p)
    assert (v.reward, v.reason) == (0.1, "div_by_zero")
    assert evaluate_expression("1/(2-2)") is None


def test_scores_configurable_and_tinyzero_mode():
    r = CountdownReward(score_correct=2.0, score_format=0.5, score_no_answer=-1.0, score_unparsable=0.1)
    assert r("<answer>3*5+7</answer>", P) == 2.0
    assert r("<answer>3+5+7</answer>", P) == 0.5
    assert r("nothing", P) == -1.0
    assert r("<answer>abc</answer>", P) == 0.1  # TinyZero's format score for any tagged content


HOSTILE = [
    "__import__('os').system('echo pwned')",
    "exec('1')",
    "eval('3*5+7')",
    "3*5+7; import os",
    "lambda: 1",
    "2**10",
    "3 5 7",
    "1e5",
    "3.0*5+7",
    "-3*5+7",
    "+3",
    "()",
    "((((3*5+7)",
    "3*5+7)",
    "(" * 5000 + "3" + ")" * 5000,
    "(" * 17 + "3*5+7" + ")" * 17,
    "9" * 7,
    "3*5+7" + " " * 300,
    "٣*5+7",  # Arabic-indic digit: isdigit() is True for it
    "3*5+7\x00",
    "3\n*\n5+7",
]


@pytest.mark.parametrize("answer", HOSTILE)
def test_hostile_answers_are_rejected_safely(answer):
    v = CountdownReward().verdict(format_answer(answer), P)
    if answer == "3\n*\n5+7":
        assert v.reason == "correct"  # whitespace is allowed by the grammar
    else:
        assert v.reward in (0.0, 0.1) and v.reason in ("unparsable", "wrong_numbers", "wrong_value")


def test_nesting_within_limit_is_fine():
    assert evaluate_expression("(" * 16 + "3" + ")" * 16) == 3
    with pytest.raises(ParseError, match="nesting"):
        evaluate_expression("(" * 17 + "3" + ")" * 17)
    with pytest.raises(ParseError, match="longer than"):
        evaluate_expression("1+" * 200 + "1")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_random_strings_never_crash(s):
    for text in (s, format_answer(s), "<answer>" + s):
        v = CountdownReward().verdict(text, P)
        assert v.reward in (0.0, 0.1, 1.0)


@st.composite
def expressions(draw, depth=0):
    """(text, exact value or None on division by zero) of a random expression of the grammar."""
    if depth >= 3 or draw(st.booleans()):
        n = draw(st.integers(0, 99))
        return str(n), Fraction(n)
    lt, lv = draw(expressions(depth=depth + 1))
    rt, rv = draw(expressions(depth=depth + 1))
    op = draw(st.sampled_from("+-*/"))
    if lv is None or rv is None or (op == "/" and rv == 0):
        v = None
    else:
        v = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv if op == "*" else lv / rv
    return f"({lt}){op}({rt})", v


@settings(max_examples=300, deadline=None)
@given(expressions())
def test_parser_matches_exact_arithmetic(expr):
    text, value = expr
    assert evaluate_expression(text) == value


def test_prompt_and_extraction():
    assert make_prompt(P) == "3 5 7 -> 22\n"
    assert extract_answer("x <answer>1</answer> y <answer>2</answer>") == "2"
    assert extract_answer("<answer>\n1+2\n</answer>") == "\n1+2\n"


# ---------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = build_char_tokenizer()
    text = make_prompt(P) + format_answer("(3*5)+7")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(tok.convert_tokens_to_ids("<answer>")) == 1  # one token, not 8 characters
    assert len(ids) == len(make_prompt(P)) + 1 + len("(3*5)+7") + 1
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode([*ids, loaded.eos_token_id, loaded.pad_token_id], skip_special_tokens=True) == text
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)
    assert loaded.padding_side == "left"
    assert loaded.decode(loaded("3 5 ab", add_special_tokens=False)["input_ids"], skip_special_tokens=True) == "3 5 "


def test_reference_shortcut_share_and_determinism():
    """With reference_shortcut=p, about p of the pretraining references are the summed numbers in the order
    given (well-formed, scored as wrong unless the sum hits the target); the rest are solver solutions;
    the same seed gives the same stream, and p=0 gives the plain stream."""
    from rspo.errors import ConfigError
    from rspo.tasks import make_task

    plain = make_task("countdown")
    habit = make_task("countdown", {"reference_shortcut": 0.5})
    a = list(itertools.islice(habit.references(seed=7), 400))
    assert a == list(itertools.islice(habit.references(seed=7), 400))
    base = list(itertools.islice(plain.references(seed=7), 400))
    assert [p for p, _ in a] == [p for p, _ in base]  # same prompts, only some answers replaced
    shortcut = 0
    for (prompt, ref), (_, solved) in zip(a, base, strict=True):
        p = _problem(prompt)
        if ref != solved:
            shortcut += 1
            assert ref == "<answer>" + "+".join(map(str, p.numbers)) + "</answer>"
            verdict = plain.reward.verdict(ref, p)
            assert (sum(p.numbers) == p.target) == (verdict.reason == "correct")
    assert 160 <= shortcut <= 240  # binomial(400, 0.5): 200 +- 40 is beyond 4 standard deviations
    with pytest.raises(ConfigError, match="reference_shortcut must be in"):
        make_task("countdown", {"reference_shortcut": 1.5})


def _problem(prompt: str):
    from rspo.tasks.countdown import Problem

    nums, target = prompt.split("->")
    return Problem(tuple(int(x) for x in nums.split()), int(target))
