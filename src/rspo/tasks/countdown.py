"""The Countdown task: reach a target with + - * / and parentheses, using each given number once.

Problem: 3 or 4 integers and a target (TinyZero's Countdown-Tasks-3to4 ranges by default:
numbers 1..99, target 1..99). Answer format: an expression inside ``<answer> ... </answer>``;
the LAST answer tag counts. Reward (TinyZero's rules, scores configurable):

- no ``<answer>...</answer>`` tag: ``score_no_answer`` (0.0)
- a tag whose content is not an expression of the grammar: ``score_unparsable`` (0.0; TinyZero
  gives its format score 0.1 here: set ``score_unparsable=0.1`` for identical behaviour)
- well-formed but wrong value, numbers not used exactly once, or division by zero: ``score_format`` (0.1)
- correct: ``score_correct`` (1.0)

The verifier never calls ``eval``/``exec``: a recursive-descent parser for exactly this grammar
(non-negative integers, binary + - * /, parentheses; no unary minus, no decimals), exact
rational arithmetic (``fractions.Fraction``), and limits on length and nesting depth.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

from rspo.tasks.base import Task, Verdict, register_task
from rspo.tasks.files import DATA_DIR

MAX_ANSWER_CHARS = 256
MAX_DEPTH = 16
MAX_DIGITS = 6


# ----------------------------------------------------------------------------------------
# Problems and the exact solver
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]
    target: int

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Identity for split disjointness: the multiset of numbers and the target."""
        return tuple(sorted(self.numbers)), self.target


def _combine(va: Fraction, ta: str, pa: int, vb: Fraction, tb: str, pb: int) -> Iterator[tuple[Fraction, str, int]]:
    """All results of one operation on two sub-expressions (value, text, precedence 0=atom 1=*/ 2=+-).

    Parentheses are minimal: an additive operand is wrapped under * and /, and on the right of
    -; a multiplicative one only on the right of /.
    """
    yield va + vb, f"{ta}+{tb}", 2
    yield va - vb, f"{ta}-{_wrap(tb, pb, 2)}", 2
    yield vb - va, f"{tb}-{_wrap(ta, pa, 2)}", 2
    yield va * vb, f"{_wrap(ta, pa, 2)}*{_wrap(tb, pb, 2)}", 1
    if vb != 0:
        yield va / vb, f"{_wrap(ta, pa, 2)}/{_wrap(tb, pb, 1)}", 1
    if va != 0:
        yield vb / va, f"{_wrap(tb, pb, 2)}/{_wrap(ta, pa, 1)}", 1


def _wrap(text: str, prec: int, limit: int) -> str:
    """Parenthesise a sub-expression whose precedence is >= limit."""
    return f"({text})" if prec >= limit else text


@lru_cache(maxsize=8192)
def _reachable(values: tuple[int, ...]) -> dict[Fraction, tuple[str, int]]:
    """Every value reachable using ALL of ``values`` (sorted) once -> (one expression, its precedence).

    Exhaustive over all orders and bracketings: the multiset is split into two non-empty parts in
    every way, and each pair of reachable sub-values is combined with every operation. The first
    expression found for a value is kept, so results are deterministic.
    """
    if len(values) == 1:
        return {Fraction(values[0]): (str(values[0]), 0)}
    out: dict[Fraction, tuple[str, int]] = {}
    n = len(values)
    for r in range(1, n // 2 + 1):
        for left in itertools.combinations(range(n), r):
            if 2 * r == n and 0 not in left:
                continue  # each unordered split once
            right = [i for i in range(n) if i not in left]
            lv = _reachable(tuple(values[i] for i in left))
            rv = _reachable(tuple(values[i] for i in right))
            for va, (ta, pa) in lv.items():
                for vb, (tb, pb) in rv.items():
                    for v, t, p in _combine(va, ta, pa, vb, tb, pb):
                        if v not in out:
                            out[v] = (t, p)
    return out


def solve(numbers: tuple[int, ...] | list[int], target: int) -> str | None:
    """An expression using every number exactly once that equals ``target`` exactly, or None.

    Exhaustive over all orders and bracketings (exact fractions; intermediate non-integers
    allowed). Deterministic: the same problem always gives the same expression.
    """
    hit = _reachable(tuple(sorted(numbers))).get(Fraction(target))
    return None if hit is None else hit[0]


def reachable_targets(numbers: tuple[int, ...] | list[int], lo: int, hi: int) -> list[int]:
    """The integers in [lo, hi] that ``numbers`` reach (each used once), ascending."""
    return sorted(int(v) for v in _reachable(tuple(sorted(numbers))) if v.denominator == 1 and lo <= v <= hi)


@dataclass(frozen=True)
class CountdownSpec:
    """Generator settings (in the spirit of TinyZero's Countdown-Tasks-3to4).

    Numbers: ``count`` uniform in [min_count, max_count], each uniform in [min_number, max_number].
    Target: with ``solvable_only`` (default) uniform over the integers in [min_target, max_target]
    that the numbers reach (numbers are redrawn if they reach none); otherwise uniform in range.
    """

    min_count: int = 3
    max_count: int = 4
    min_number: int = 1
    max_number: int = 99
    min_target: int = 1
    max_target: int = 99
    solvable_only: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.min_count <= self.max_count <= 5:
            raise ValueError(f"need 2 <= min_count <= max_count <= 5, got {self.min_count}, {self.max_count}")
        if not 0 <= self.min_number <= self.max_number:
            raise ValueError(f"need 0 <= min_number <= max_number, got {self.min_number}, {self.max_number}")
        if not self.min_target <= self.max_target:
            raise ValueError(f"need min_target <= max_target, got {self.min_target}, {self.max_target}")


def generate_many(spec: CountdownSpec, rng: random.Random, targets_per_draw: int = 1) -> list[Problem]:
    """Problems sharing one draw of numbers: up to ``targets_per_draw`` distinct targets."""
    for _ in range(100_000):
        count = rng.randint(spec.min_count, spec.max_count)
        numbers = tuple(rng.randint(spec.min_number, spec.max_number) for _ in range(count))
        if not spec.solvable_only:
            return [Problem(numbers, rng.randint(spec.min_target, spec.max_target)) for _ in range(targets_per_draw)]
        targets = reachable_targets(numbers, spec.min_target, spec.max_target)
        if targets:
            chosen = rng.sample(targets, min(targets_per_draw, len(targets)))
            return [Problem(numbers, t) for t in chosen]
    raise RuntimeError(f"no solvable problem found in 100,000 draws with {spec}")


def generate(spec: CountdownSpec, rng: random.Random) -> Problem:
    """One seeded problem (see :class:`CountdownSpec`)."""
    return generate_many(spec, rng, 1)[0]


def save_problems(path: str | Path, problems: list[Problem]) -> None:
    with Path(path).open("w") as f:
        for p in problems:
            f.write(json.dumps({"numbers": list(p.numbers), "target": p.target}) + "\n")


def load_problems(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file of {"numbers": [...], "target": int}; bad lines raise naming file and line."""
    out = []
    with Path(path).open() as f:
        for i, line in enumerate(f, 1):
            try:
                d = json.loads(line)
                numbers, target = d["numbers"], d["target"]
                if not (
                    isinstance(numbers, list) and all(isinstance(x, int) for x in numbers) and isinstance(target, int)
                ):
                    raise ValueError("numbers must be a list of ints and target an int")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a Countdown problem ({e})") from None
            out.append(Problem(tuple(numbers), target))
    return out


@dataclass
class CountdownSplits:
    """Fixed validation and test splits (by seed) and a train stream disjoint from both.

    ``validation`` and ``test`` are generated once from their own seeds; a problem key (numbers
    as a multiset, target) appearing in test is skipped in validation, and train skips every
    key of either.
    """

    spec: CountdownSpec = field(default_factory=CountdownSpec)
    n_validation: int = 500
    n_test: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.is_default() and all((DATA_DIR / f"countdown-{s}.jsonl").is_file() for s in ("validation", "test")):
            # The default splits ship with the package (regenerating them takes seconds; a test
            # checks that the shipped files equal what this code generates).
            self.test = load_problems(DATA_DIR / "countdown-test.jsonl")
            self.validation = load_problems(DATA_DIR / "countdown-validation.jsonl")
        else:
            self.generate()
        self.held_out = {p.key for p in self.test} | {p.key for p in self.validation}

    def is_default(self) -> bool:
        return (self.spec, self.n_validation, self.n_test, self.seed) == (CountdownSpec(), 500, 1000, 0)

    def generate(self) -> None:
        """(Re)generate validation and test from their seeds."""
        self.test = self._fixed("test", self.n_test, exclude=set())
        self.validation = self._fixed("validation", self.n_validation, exclude={p.key for p in self.test})

    def _fixed(self, split: str, n: int, exclude: set) -> list[Problem]:
        rng = random.Random(f"countdown/{self.seed}/{split}")
        out, seen = [], set(exclude)
        while len(out) < n:
            p = generate(self.spec, rng)
            if p.key not in seen:
                seen.add(p.key)
                out.append(p)
        return out

    def split(self, name: str) -> list[Problem]:
        if name not in ("validation", "test"):
            raise ValueError(f"split {name!r}: fixed splits are 'validation' and 'test' (train is a stream)")
        return self.test if name == "test" else self.validation

    def train_stream(self, seed: int = 0, targets_per_draw: int = 1) -> Iterator[Problem]:
        """An endless seeded stream of train problems, none of them in validation or test.

        ``targets_per_draw`` > 1 yields several targets per draw of numbers (one solver call for
        all of them; used by pretraining, which needs many problems per second).
        """
        rng = random.Random(f"countdown/{self.seed}/train/{seed}")
        while True:
            for p in generate_many(self.spec, rng, targets_per_draw):
                if p.key not in self.held_out:
                    yield p


# ----------------------------------------------------------------------------------------
# Prompt, answer extraction and the verifier
# ----------------------------------------------------------------------------------------
PROMPT_TEMPLATE = "{numbers} -> {target}\n"


def make_prompt(p: Problem, template: str = PROMPT_TEMPLATE) -> str:
    return template.format(numbers=" ".join(map(str, p.numbers)), target=p.target)


def format_answer(expression: str) -> str:
    return f"<answer>{expression}</answer>"


_OPEN, _CLOSE = "<answer>", "</answer>"


def extract_answer(text: str) -> str | None:
    """The content of the LAST ``<answer>...</answer>`` tag, or None.

    Exactly the last match of ``re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)`` (non-overlapping,
    left to right), in one linear scan: the regex rescans to the end of the text from every unclosed
    ``<answer>``, which is quadratic (16k unclosed tags took 9 s). Once no ``</answer>`` follows an
    opening tag, none follows any later one either, so the scan stops there.
    """
    last, pos = None, 0
    while True:
        start = text.find(_OPEN, pos)
        if start < 0:
            return last
        end = text.find(_CLOSE, start + len(_OPEN))
        if end < 0:
            return last
        last, pos = text[start + len(_OPEN) : end], end + len(_CLOSE)


class ParseError(ValueError):
    pass


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := INT | '(' expr ')'."""

    def __init__(self, text: str) -> None:
        self.toks = self._lex(text)
        self.i = 0
        self.numbers: list[int] = []
        self.div_by_zero = False

    @staticmethod
    def _lex(text: str) -> list[str]:
        if len(text) > MAX_ANSWER_CHARS:
            raise ParseError(f"answer longer than {MAX_ANSWER_CHARS} characters")
        toks, i = [], 0
        while i < len(text):
            ch = text[i]
            if ch in " \t\n":
                i += 1
            elif ch.isascii() and ch.isdigit():
                j = i
                while j < len(text) and text[j].isascii() and text[j].isdigit():
                    j += 1
                if j - i > MAX_DIGITS:
                    raise ParseError(f"number with more than {MAX_DIGITS} digits")
                toks.append(text[i:j])
                i = j
            elif ch in "+-*/()":
                toks.append(ch)
                i += 1
            else:
                raise ParseError(f"unexpected character {ch!r}")
        return toks

    def parse(self) -> Fraction | None:
        if not self.toks:
            raise ParseError("empty expression")
        value = self._expr(0)
        if self.i != len(self.toks):
            raise ParseError(f"unexpected {self.toks[self.i]!r}")
        return None if self.div_by_zero else value

    def _peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _expr(self, depth: int) -> Fraction:
        value = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.toks[self.i]
            self.i += 1
            rhs = self._term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def _term(self, depth: int) -> Fraction:
        value = self._factor(depth)
        while self._peek() in ("*", "/"):
            op = self.toks[self.i]
            self.i += 1
            rhs = self._factor(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                self.div_by_zero = True  # keep parsing: well-formed, but the value is undefined
                value = Fraction(0)
            else:
                value = value / rhs
        return value

    def _factor(self, depth: int) -> Fraction:
        tok = self._peek()
        if tok is None:
            raise ParseError("unexpected end of expression")
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ParseError(f"nesting deeper than {MAX_DEPTH}")
            self.i += 1
            value = self._expr(depth + 1)
            if self._peek() != ")":
                raise ParseError("missing ')'")
            self.i += 1
            return value
        if tok.isdigit():
            self.i += 1
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        raise ParseError(f"unexpected {tok!r}")


@dataclass(frozen=True)
class CountdownVerdict:
    """Outcome of scoring one response, with the parsed answer and its value.

    reason: no_answer | unparsable | wrong_numbers | div_by_zero | wrong_value | correct.
    """

    reward: float
    reason: str
    answer: str | None = None
    value: Fraction | None = None

    @property
    def correct(self) -> bool:
        return self.reason == "correct"


@dataclass(frozen=True)
class CountdownReward:
    """TinyZero-compatible reward for Countdown (scores configurable)."""

    score_correct: float = 1.0
    score_format: float = 0.1
    score_no_answer: float = 0.0
    score_unparsable: float = 0.0

    def verdict(self, response: str, problem: Problem) -> CountdownVerdict:
        answer = extract_answer(response)
        if answer is None:
            return CountdownVerdict(self.score_no_answer, "no_answer")
        try:
            parser = _Parser(answer)
            value = parser.parse()
        except (ParseError, RecursionError):
            return CountdownVerdict(self.score_unparsable, "unparsable", answer)
        if sorted(parser.numbers) != sorted(problem.numbers):
            return CountdownVerdict(self.score_format, "wrong_numbers", answer, value)
        if value is None:
            return CountdownVerdict(self.score_format, "div_by_zero", answer)
        if value != problem.target:
            return CountdownVerdict(self.score_format, "wrong_value", answer, value)
        return CountdownVerdict(self.score_correct, "correct", answer, value)

    def __call__(self, response: str, problem: Problem) -> float:
        return self.verdict(response, problem).reward


def evaluate_expression(text: str) -> Fraction | None:
    """Exact value of an expression of the grammar (None on division by zero); ParseError otherwise."""
    return _Parser(text).parse()


def numbers_used(text: str) -> list[int]:
    p = _Parser(text)
    p.parse()
    return p.numbers


# ----------------------------------------------------------------------------------------
# The registered task
# ----------------------------------------------------------------------------------------
@dataclass
class CountdownOptions:
    score_correct: float = 1.0
    """Reward of a correct answer."""
    score_format: float = 0.1
    """Well-formed but wrong answer (TinyZero's format score)."""
    score_no_answer: float = 0.0
    """No <answer> tag."""
    score_unparsable: float = 0.0
    """A tag whose content is not an expression (TinyZero gives its format score here)."""
    max_new_tokens: int = 32
    """Response length limit: "<answer>" + an expression of 4 two-digit numbers + "</answer>" + eos fits in 24."""
    reference_shortcut: float = 0.0
    """Pretraining only: the share of reference responses replaced by a shortcut, the numbers summed in the
    order given (well-formed, usually wrong). A base policy with this habit knows the solver's answers but
    often does not prefer them: headroom that RL can take (issue 13). 0 = solver solutions only."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"task.options.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.reference_shortcut <= 1:
            raise ValueError(f"task.options.reference_shortcut must be in [0, 1], got {self.reference_shortcut}")


@register_task
class CountdownTask(Task):
    """Countdown with the shipped fixed splits (validation 500, test 1,000) and a disjoint train stream."""

    name = "countdown"
    reasons = ("no_answer", "unparsable", "wrong_numbers", "div_by_zero", "wrong_value", "correct")
    Options = CountdownOptions

    def __init__(self, options: CountdownOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        self.reward = CountdownReward(o.score_correct, o.score_format, o.score_no_answer, o.score_unparsable)
        self.splits = CountdownSplits()

    def train_examples(self, seed: int) -> Iterator[Problem]:
        return self.splits.train_stream(seed=seed)

    def eval_splits(self) -> list[str]:
        return ["validation", "test"]

    def eval_examples(self, split: str) -> list[Problem]:
        if split not in self.eval_splits():
            raise self.unknown_split(split)
        return self.splits.split(split)

    def prompt(self, example: Problem) -> str:
        return make_prompt(example)

    def verdict(self, response: str, example: Problem) -> Verdict:
        v = self.reward.verdict(response, example)
        return Verdict(v.reward, v.reason, v.reason == "correct")

    def reference(self, example: Problem) -> str:
        return format_answer(solve(example.numbers, example.target))

    def references(self, seed: int) -> Iterator[tuple[str, str]]:
        """Solved train problems, several targets per draw of numbers (one solver call for all of them); a
        ``reference_shortcut`` share of them answered by the shortcut instead (seeded)."""
        rng = random.Random(f"shortcut-{seed}")
        for p in self.splits.train_stream(seed=seed, targets_per_draw=4):
            if self.options.reference_shortcut and rng.random() < self.options.reference_shortcut:
                yield make_prompt(p), format_answer("+".join(map(str, p.numbers)))
            else:
                yield make_prompt(p), self.reference(p)

    def group(self, example: Problem) -> str:
        """The number count: 3- and 4-number problems differ in difficulty."""
        return f"{len(example.numbers)} numbers"

    def record(self, example: Problem) -> dict:
        return {"numbers": list(example.numbers), "target": example.target}
