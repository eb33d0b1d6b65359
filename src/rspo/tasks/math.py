"""The math task: RLVR on problems with a final answer, graded by math-verify on the last boxed answer.

Data: local JSONL or Parquet files, one problem per row, in either of the two formats people have:

- verl's: ``{"data_source": ..., "prompt": [{"role": "user", "content": ...}], "reward_model":
  {"ground_truth": ...}, ...}``: the prompt is used as given (it already holds the instruction);
- plain: ``{"problem" | "question": ..., "answer" | "solution": ...}``: the prompt is the problem followed
  by ``instruction``, as chat messages (``prompt_format: chat``) or plain text; with only a
  ``solution``, the answer is its last ``\\boxed{}``. A ``solution`` is also the reference response
  that ``rspo pretrain`` can train on.

``builtin:math/NAME`` names a file shipped with rspo (``src/rspo/tasks/data/math/``): a hand-written
sample set in both formats and synthetic arithmetic for the tiny example.

Grading (the contract; docs/grading.md has it with examples):

- The answer is the argument of the last ``\\boxed`` (or ``\\fbox``) of the response, as TeX reads it: a
  braced group, or one token without braces (``\\boxed 5``). No box, or unbalanced braces (a truncated
  response): ``no_answer``. An answer longer than ``max_answer_chars`` is wrong unparsed.
- Normalised before comparing: percent signs (``50\\%`` = ``50``, as the MATH grader), ``\\left``/``\\right``,
  spacing commands, ``$``, degrees, ``\\dfrac``/``\\tfrac``, ``\\text{}`` wrappers, a trailing period.
- Equal when the normal forms are equal, or math-verify (sympy, with its own time limits) finds the values
  equal: fractions, decimals, intervals, sets, expressions, units in text dropped.
- Never correct: an equation whose sides disagree (``6 = 5``, ``1 = 2 = 5``) when the truth is not an
  equation; only a plain assignment (``x = 5``) counts as its value, and every other side must agree
  with the last. An answer with a free variable when the truth has none (``\\frac{5x}{x}`` for ``5``). A
  number in another base: a subscript base (``1011_2``) is part of the value, the base must match, and
  a bare numeral is read in the other side's base (``1011`` is ``1011_2``).
- Nothing is ever evaluated with ``eval``. A user's reward function can replace the grader:
  ``reward_fn: my_pkg.module:function`` called as ``function(response, example)``, returning a float
  (correct when >= 1) or a :class:`~rspo.tasks.Verdict`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rspo.errors import ConfigError
from rspo.tasks.base import FileTask, Prompt, Verdict, import_object, register_task
from rspo.tasks.files import resolve_path, rows

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


# ----------------------------------------------------------------------------------------
# Examples and loading
# ----------------------------------------------------------------------------------------
@dataclass
class MathExample:
    """One problem: its prompt (chat messages or text), ground-truth answer, and where it came from."""

    id: str
    prompt: Prompt
    answer: str
    source: str = ""
    solution: str | None = None


def _strip_answer(answer: str) -> str:
    """A ground truth as written in data: ``$...$`` and a surrounding ``\\boxed{}`` removed."""
    a = answer.strip()
    if len(a) >= 2 and a[0] == "$" and a[-1] == "$":
        a = a.strip("$").strip()
    boxed = last_boxed(a)
    return boxed.strip() if boxed is not None and a.startswith(("\\boxed", "\\fbox")) else a


def example_of(row: Any, where: str, instruction: str, prompt_format: str) -> MathExample:
    """One row of a data file (verl's or the plain format) as a :class:`MathExample`; errors name ``where``."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a row must be a JSON object")
    if "reward_model" in row or isinstance(row.get("prompt"), list):  # verl's format
        msgs, rm = row.get("prompt"), row.get("reward_model")
        if not (
            isinstance(msgs, list) and msgs and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs)
        ):
            raise ConfigError(f"{where}: verl format needs 'prompt' as a list of {{role, content}} messages")
        if not isinstance(rm, dict) or "ground_truth" not in rm:
            raise ConfigError(f"{where}: verl format needs reward_model.ground_truth")
        gt = rm["ground_truth"]
        gt = gt[0] if isinstance(gt, list) and len(gt) == 1 else gt
        if not isinstance(gt, (str, int, float)):
            raise ConfigError(f"{where}: reward_model.ground_truth must be a string or number")
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
        prompt: Prompt = msgs if prompt_format == "chat" else "\n".join(m["content"] for m in msgs) + "\n"
        extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
        return MathExample(
            str(extra.get("index", where)),
            prompt,
            _strip_answer(str(gt)),
            str(row.get("data_source", "")),
            extra.get("solution"),
        )
    problem = row.get("problem", row.get("question"))
    if not isinstance(problem, str) or not problem.strip():
        raise ConfigError(f"{where}: needs 'problem' or 'question' (plain format) or verl's 'prompt'")
    solution = row.get("solution") if isinstance(row.get("solution"), str) else None
    answer = row.get("answer")
    if answer is None and solution is not None:
        answer = last_boxed(solution)
        if answer is None:
            raise ConfigError(f"{where}: no 'answer', and the 'solution' has no \\boxed{{}} answer")
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise ConfigError(f"{where}: needs 'answer' (or a 'solution' with a \\boxed{{}} answer)")
    text = f"{problem.strip()}\n{instruction}".strip() if instruction else problem.strip()
    prompt = [{"role": "user", "content": text}] if prompt_format == "chat" else text + "\n"
    return MathExample(
        str(row.get("id", where)), prompt, _strip_answer(str(answer)), str(row.get("source", "")), solution
    )


def load_examples(path: str, instruction: str = DEFAULT_INSTRUCTION, prompt_format: str = "chat") -> list[MathExample]:
    """Every row of a JSONL / Parquet file as a :class:`MathExample`; a bad row is an error naming file:line."""
    p = resolve_path(path)
    out = [example_of(row, f"{path}:{i}", instruction, prompt_format) for i, row in rows(p)]
    if not out:
        raise ConfigError(f"data file {path!r} holds no examples")
    return out


# ----------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------
_BOX_NAMES = ("\\boxed", "\\fbox")
_CONTROL_SEQUENCE = re.compile(r"\\(?:[A-Za-z]+|.)", flags=re.DOTALL)


def _last_box_end(text: str) -> int:
    """Index just after the name of the last ``\\boxed`` / ``\\fbox`` command (not ``\\boxedsep``), or -1."""
    best = -1
    for name in _BOX_NAMES:
        j = len(text)
        while (j := text.rfind(name, 0, j)) >= 0:
            k = j + len(name)
            if k >= len(text) or not text[k].isalpha():  # a longer command name is another command
                best = max(best, k)
                break
    return best


def last_boxed(text: str) -> str | None:
    """The argument of the last ``\\boxed`` (or ``\\fbox``), else None.

    As TeX reads it: a braced group (balanced braces), or without braces one token, a character or a
    control sequence (``\\boxed 5`` is ``5``, ``\\boxed\\pi`` is ``\\pi``). Unbalanced braces (a truncated
    response) give None. One scan from the last opening: linear in the length of the text.
    """
    i = _last_box_end(text)
    if i < 0:
        return None
    while i < len(text) and text[i] in " \t\n":
        i += 1
    if i >= len(text) or text[i] == "}":
        return None
    if text[i] == "\\":  # a control sequence: a letter run, or one symbol
        m = _CONTROL_SEQUENCE.match(text, i)
        return m.group(0) if m else None
    if text[i] != "{":
        return text[i]
    depth, start = 1, i + 1
    for j in range(start, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:j]
    return None  # unbalanced: a truncated response


_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "^\\circ", "^{\\circ}", "\\circ", "\\%", "%")


def normalize_answer(s: str) -> str:
    """A plain normal form for string comparison (the fallback when math-verify parses neither side)."""
    s = _TEXT_CMD.sub(r"\1", s.strip())
    for d in _DROP:
        s = s.replace(d, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace(" ", "")
    s = s.rstrip(".")
    if s.startswith("."):
        s = "0" + s
    return s


def _drop_percent(s: str) -> str:
    return s.replace("\\%", "").replace("%", "").strip()


_OPEN, _CLOSE = "({[", ")}]"


def equation_sides(s: str) -> list[str]:
    """``s`` split at its top-level ``=`` signs (outside brackets and braces; ``<=``, ``>=``, ``!=`` and ``==``
    are not equations): one element when ``s`` is not an equation."""
    sides, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(0, depth - 1)
        elif c == "=" and depth == 0:
            before, after = s[i - 1 : i], s[i + 1 : i + 2]
            if before not in ("<", ">", "!", "=") and after != "=":
                sides.append(s[start:i])
                start = i + 1
    return [*sides, s[start:]]


_VARIABLE = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?$")
_BASED = re.compile(r"^\(?([0-9A-Za-z]+)\)?_\{?\(?([0-9]+)\)?\}?$")
_DIGITS = re.compile(r"^[0-9A-Za-z]+$")


def is_variable(s: str) -> bool:
    """A plain variable name (``x``, ``y_1``, ``a_{n}``, ``\\theta``): the left side of an assignment."""
    return bool(_VARIABLE.match(s.replace(" ", "")))


def based_number(s: str) -> tuple[str, int] | None:
    """``(digits, base)`` of a number written with a subscript base (``1011_2``, ``(1011)_{2}``, ``FF_{16}``),
    else None. Digits hold a decimal digit or are upper-case letters (``x_{10}`` is a variable), each below
    the base; bases 2 to 36."""
    m = _BASED.match(normalize_answer(s))
    if m is None:
        return None
    digits, base = m.group(1), int(m.group(2))
    if not 2 <= base <= 36 or not (any(c.isdigit() for c in digits) or digits.isupper()):
        return None
    try:
        int(digits, base)
    except ValueError:
        return None
    return digits, base


def _based_equal(answer: str, truth: str) -> bool | None:
    """With a subscript base on either side: whether both denote the same number in the same base (a side
    without a base is read in the other's), else None (no base anywhere: compare otherwise)."""
    a, t = based_number(answer), based_number(truth)
    if a is None and t is None:
        return None
    if a is not None and t is not None:
        return a[1] == t[1] and int(a[0], a[1]) == int(t[0], t[1])
    digits, (_, base) = normalize_answer(truth if t is None else answer), (a or t)
    if not _DIGITS.match(digits):
        return False
    try:
        return int(digits, base) == int((a or t)[0], base)
    except ValueError:  # a digit the base does not have
        return False


def _free_symbols(expr: Any) -> set:
    symbols = getattr(expr, "free_symbols", None)
    return symbols if isinstance(symbols, set) else set()


class MathGrader:
    """``correct(answer, ground_truth)``: math-verify equivalence, or equal normal forms, under the grading
    contract of the module docstring (equations, free variables, bases)."""

    def __init__(self, use_math_verify: bool = True, timeout_s: int = 5, max_chars: int = 1000) -> None:
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self._mv = None
        if use_math_verify:
            try:
                import math_verify
            except ImportError:
                raise ConfigError(
                    "task.options.grader=math_verify needs the math-verify package "
                    "(pip install math-verify), or use grader=string"
                ) from None
            logging.getLogger("math_verify").setLevel(logging.ERROR)  # it logs every timeout
            self._mv = math_verify
            self.correct("1", "1")  # warm the parser up once (forked scoring workers inherit it)

    def __getstate__(self) -> dict:  # sent to scoring workers: the module is imported again there
        return {**self.__dict__, "_mv": None, "_use_mv": self._mv is not None}

    def __setstate__(self, state: dict) -> None:
        use = state.pop("_use_mv", False)
        self.__dict__.update(state)
        if use:
            import math_verify

            logging.getLogger("math_verify").setLevel(logging.ERROR)
            self._mv = math_verify

    def _parse(self, latex: str):
        mv = self._mv
        cfg = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
        return mv.parse("\\boxed{" + latex + "}", extraction_config=cfg, parsing_timeout=self.timeout_s)

    def correct(self, answer: str, truth: str) -> bool:
        if len(answer) > self.max_chars:
            return False
        a, t = _drop_percent(answer), _drop_percent(truth)
        based = _based_equal(a, t)
        if based is not None:
            return based
        sides = equation_sides(a)
        if len(sides) > 1 and len(equation_sides(t)) == 1:
            # An equation for a non-equation truth: a plain assignment (x = 5) counts as its value; otherwise
            # every side must equal the last one (6 = 5 or 1 = 2 = 5 is no hedge that pays).
            if is_variable(sides[0]):
                sides = sides[1:]
            if any(is_variable(s) or not self._equal(s, sides[-1]) for s in sides[:-1]):
                return False
            a = sides[-1]
        return self._equal(a, t)

    def _equal(self, a: str, t: str) -> bool:
        if normalize_answer(a) == normalize_answer(t):
            return True
        if self._mv is None:
            return False
        try:
            gold, pred = self._parse(t), self._parse(a)
            if not (gold and pred):
                return False
            if _free_symbols(pred[0]) and not _free_symbols(gold[0]):
                return False  # a variable left in the answer to a number (5x/x for 5) is not that number
            return bool(self._mv.verify(gold, pred, timeout_seconds=self.timeout_s))
        except Exception:  # sympy on hostile input: anything can go wrong; it is simply not a match
            return False


# ----------------------------------------------------------------------------------------
# The registered task
# ----------------------------------------------------------------------------------------
@dataclass
class MathOptions:
    train: list[str] = field(default_factory=list)
    """Training data files (JSONL / Parquet, verl or plain format; ``builtin:math/...`` for shipped ones)."""
    eval: dict[str, str] = field(default_factory=dict)
    """Evaluation splits: name -> file, e.g. {aime24: data/aime24.parquet}; the first is the validation split."""
    instruction: str = DEFAULT_INSTRUCTION
    """Appended to plain-format problems (verl-format prompts are used as given)."""
    prompt_format: Literal["chat", "text"] = "chat"
    """Prompts as chat messages (rendered with the model's chat template) or as plain text."""
    max_new_tokens: int = 1024
    """Response length limit."""
    stop_strings: list[str] = field(default_factory=list)
    """Extra strings that end a response (besides the model's end-of-sequence tokens)."""
    grader: Literal["math_verify", "string"] = "math_verify"
    """math_verify (with the string comparison as fallback), or the normalised string comparison alone."""
    verify_timeout_s: int = 5
    """math-verify's own time limit per parse and per comparison, in whole seconds."""
    max_answer_chars: int = 1000
    """A boxed answer longer than this is wrong without being parsed."""
    score_correct: float = 1.0
    """Reward of a correct answer."""
    score_wrong: float = 0.0
    """Reward of a wrong boxed answer."""
    score_no_answer: float = 0.0
    """Reward of a response without a boxed answer."""
    reward_fn: str | None = None
    """Replace the grader: ``pkg.module:function(response, example) -> float | Verdict`` (correct when >= 1)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.verify_timeout_s < 1 or self.max_answer_chars < 1:
            raise ValueError("task.options.max_new_tokens, verify_timeout_s and max_answer_chars must be >= 1")
        for path in [*self.train, *self.eval.values()]:
            resolve_path(path)  # a missing file fails when the config is built


@register_task
class MathTask(FileTask):
    """Math RLVR on local data files (see the module docstring)."""

    name = "math"
    reasons = ("correct", "wrong_answer", "no_answer")
    Options = MathOptions

    def __init__(self, options: MathOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        self._fn: Callable | None = import_object(o.reward_fn, "task.options.reward_fn") if o.reward_fn else None
        if self._fn is not None and not callable(self._fn):
            raise ConfigError(f"task.options.reward_fn={o.reward_fn!r} is not callable")
        self.grader = MathGrader(o.grader == "math_verify" and self._fn is None, o.verify_timeout_s, o.max_answer_chars)

    def load(self, path: str) -> list[MathExample]:
        return load_examples(path, self.options.instruction, self.options.prompt_format)

    def reference(self, example: MathExample) -> str | None:
        """A reference response to train on (``rspo pretrain``): the example's solution, if it has one."""
        return example.solution

    def verdict(self, response: str, example: MathExample) -> Verdict:
        o = self.options
        if self._fn is not None:
            out = self._fn(response, example)
            return out if isinstance(out, Verdict) else Verdict(out, "custom", out >= 1)
        answer = last_boxed(response)
        if answer is None:
            return Verdict(o.score_no_answer, "no_answer", False)
        if self.grader.correct(answer, example.answer):
            return Verdict(o.score_correct, "correct", True)
        return Verdict(o.score_wrong, "wrong_answer", False)

    def record(self, example: MathExample) -> dict:
        return {"id": example.id, "source": example.source, "answer": example.answer}


# ----------------------------------------------------------------------------------------
# verl's format
# ----------------------------------------------------------------------------------------
def to_verl_row(row: dict, instruction: str = DEFAULT_INSTRUCTION, data_source: str = "rspo/sample") -> dict:
    """A plain-format row in verl's format (the instruction folded into the user message, as verl's
    preprocessing scripts do)."""
    answer = row.get("answer")
    if answer is None:
        answer = last_boxed(row["solution"])
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": f"{row['problem']}\n{instruction}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"index": row["id"], **({"solution": row["solution"]} if "solution" in row else {})},
    }
