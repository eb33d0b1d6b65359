"""The code task: RLVR on programming problems, graded by running the model's program on tests in a sandbox.

Data: local JSONL or Parquet files, one problem per row, with the tests in any of the forms code RL
datasets use (all are turned into one list of tests):

- stdin/stdout (APPS, TACO, CodeContests): ``inputs`` and ``outputs`` lists, at the top level or in
  ``input_output`` (a mapping or its JSON text), or in verl's ``reward_model.ground_truth``;
- call-based (LeetCode style): the same with ``fn_name``: each input is the list of arguments, each
  output the expected return value (compared after a JSON round trip);
- assert statements (MBPP): ``test_list`` (and ``test_setup_code``), one test per assert;
- a HumanEval ``test`` that defines ``check(candidate)``, with ``entry_point``.

The problem text is ``problem`` / ``question`` / ``prompt`` (or verl's chat ``prompt``), followed by
``instruction``. The answer is the last fenced code block of the response (```python ... ``` or a bare
```); none: reward 0, reason ``no_code``. Each test runs the program in its own sandboxed process
(:mod:`rspo.sandbox`, or a SandboxFusion server); tests run ``parallel`` at a time. Reward: 1 only if
every test passes (default, as the common recipes), or the share passed (``partial_credit``);
``correct`` = every test passes. Reasons: passed, wrong_answer, runtime_error, timeout, memory,
compile_error, no_code, sandbox_error (of the first failing test; a program printing more than the
output cap is a wrong answer). Model output is never executed in the caller's interpreter.
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from rspo.errors import ConfigError
from rspo.sandbox import Limits, RunResult, run_python
from rspo.tasks.base import FileTask, Prompt, Verdict, register_task
from rspo.tasks.files import resolve_path, rows

DEFAULT_INSTRUCTION = (
    "Write a complete Python 3 program (or, where a function is asked for, the function) that solves the "
    "problem. Put your final code in one ```python ... ``` block."
)
REASONS = ("passed", "wrong_answer", "runtime_error", "timeout", "memory", "compile_error", "no_code", "sandbox_error")

# ----------------------------------------------------------------------------------------
# Examples and loading
# ----------------------------------------------------------------------------------------
Test = dict[str, Any]  # {"kind": "stdio", "input", "output"} | {"kind": "call", "fn", "args", "expected"} |
#                        {"kind": "assert", "code"}


@dataclass
class CodeExample:
    id: str
    prompt: Prompt
    tests: list[Test]
    source: str = ""
    solution: str | None = None


def _io(spec: Any, where: str) -> tuple[list, list, str | None]:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: input_output is not JSON ({e.msg})") from None
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("inputs"), list)
        or not isinstance(spec.get("outputs"), list)
    ):
        raise ConfigError(f"{where}: tests need 'inputs' and 'outputs' lists")
    if len(spec["inputs"]) != len(spec["outputs"]) or not spec["inputs"]:
        raise ConfigError(f"{where}: 'inputs' and 'outputs' must be non-empty and of equal length")
    return spec["inputs"], spec["outputs"], spec.get("fn_name")


def _tests(row: dict, where: str) -> list[Test]:
    if "test_list" in row:  # MBPP: one assert per test, after the setup code
        setup = row.get("test_setup_code") or ""
        if not isinstance(row["test_list"], list) or not row["test_list"]:
            raise ConfigError(f"{where}: test_list must be a non-empty list of assert statements")
        return [{"kind": "assert", "code": f"{setup}\n{t}"} for t in row["test_list"]]
    if "test" in row and "entry_point" in row:  # HumanEval
        return [{"kind": "assert", "code": f"{row['test']}\ncheck({row['entry_point']})"}]
    spec = row.get("input_output")
    if spec is None and isinstance(row.get("reward_model"), dict):
        spec = row["reward_model"].get("ground_truth")
    if spec is None and "inputs" in row:
        spec = {k: row[k] for k in ("inputs", "outputs", "fn_name") if k in row}
    if spec is None:
        raise ConfigError(f"{where}: no tests (inputs/outputs, input_output, test_list, or test + entry_point)")
    inputs, outputs, fn = _io(spec, where)
    if fn:
        return [
            {"kind": "call", "fn": fn, "args": a if isinstance(a, list) else [a], "expected": o}
            for a, o in zip(inputs, outputs, strict=True)
        ]
    return [{"kind": "stdio", "input": str(i), "output": str(o)} for i, o in zip(inputs, outputs, strict=True)]


def _example(row: Any, where: str, instruction: str, prompt_format: str) -> CodeExample:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a row must be a JSON object")
    tests = _tests(row, where)
    if isinstance(row.get("prompt"), list):  # verl: chat messages, used as given
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["prompt"]]
        prompt: Prompt = msgs if prompt_format == "chat" else "\n".join(m["content"] for m in msgs) + "\n"
    else:
        text = row.get("problem", row.get("question", row.get("prompt")))
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: needs 'problem', 'question' or 'prompt'")
        body = f"{text.strip()}\n\n{instruction}".strip()
        prompt = [{"role": "user", "content": body}] if prompt_format == "chat" else body + "\n"
    solution = row.get("solution")
    if solution is None and isinstance(row.get("solutions"), list) and row["solutions"]:
        solution = row["solutions"][0]
    return CodeExample(
        str(row.get("id", row.get("task_id", where))),
        prompt,
        tests,
        str(row.get("source", "")),
        solution if isinstance(solution, str) else None,
    )


def load_examples(path: str, instruction: str = DEFAULT_INSTRUCTION, prompt_format: str = "chat") -> list[CodeExample]:
    """Every row of a JSONL / Parquet file as a :class:`CodeExample`; a bad row is an error naming file:line."""
    out = [_example(row, f"{path}:{i}", instruction, prompt_format) for i, row in rows(resolve_path(path))]
    if not out:
        raise ConfigError(f"data file {path!r} holds no examples")
    return out


_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def last_code_block(text: str) -> str | None:
    """The content of the last fenced block (```python or a bare ```; other languages are skipped)."""
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in ("", "python", "py", "python3")]
    return blocks[-1] if blocks else None


# ----------------------------------------------------------------------------------------
# Executors: the local sandbox, or a SandboxFusion server
# ----------------------------------------------------------------------------------------
class SandboxFusion:
    """A client of a SandboxFusion server's ``/run_code`` (https://github.com/bytedance/SandboxFusion)."""

    def __init__(self, url: str, request_timeout_s: float = 60.0) -> None:
        self.url, self.timeout = url.rstrip("/"), request_timeout_s

    def run(self, code: str, stdin: str, limits: Limits) -> RunResult:
        body = {
            "code": code,
            "language": "python",
            "stdin": stdin,
            "run_timeout": limits.wall_s,
            "memory_limit_MB": limits.memory_mb,
        }
        req = urllib.request.Request(
            f"{self.url}/run_code", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout + limits.wall_s) as resp:
                data = json.loads(resp.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError, ValueError) as e:
            return RunResult("sandbox_error", None, "", f"SandboxFusion request failed: {e}", 0.0)
        run = data.get("run_result") or {}
        comp = data.get("compile_result") or {}
        out, err = str(run.get("stdout") or ""), str(run.get("stderr") or comp.get("stderr") or "")
        rc, wall = run.get("return_code"), float(run.get("execution_time") or 0.0)
        if data.get("status") == "SandboxError":
            return RunResult("sandbox_error", rc, out, err or str(data.get("message", "")), wall)
        if run.get("status") == "TimeLimitExceeded":
            return RunResult("timeout", rc, out, err, wall)
        if len(out) + len(err) > limits.output_kb * 1024:
            return RunResult("output_limit", rc, out, err, wall)
        if rc == 0 and data.get("status") == "Success":
            return RunResult("ok", 0, out, err, wall)
        return RunResult("memory" if "MemoryError" in err else "runtime_error", rc, out, err, wall)


class LocalSandbox:
    """:func:`rspo.sandbox.run_python`, at most ``parallel`` programs at once in this process."""

    def __init__(self, parallel: int) -> None:
        self.slots = threading.BoundedSemaphore(parallel)

    def run(self, code: str, stdin: str, limits: Limits) -> RunResult:
        with self.slots:
            return run_python(code, stdin, limits)


# ----------------------------------------------------------------------------------------
# Grading one test
# ----------------------------------------------------------------------------------------
_CALL = """
import json as _json, sys as _sys
_args = _json.loads(_sys.stdin.read())
_out = {fn}(*_args)
_sys.stdout.write("\\n<<rspo-result>>" + _json.dumps(_out))
"""


def _norm(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _failure(r: RunResult) -> str:
    """The reason of a run that did not pass."""
    if r.status == "ok":
        return "wrong_answer"
    if r.status == "output_limit":
        return "wrong_answer"
    if r.status == "runtime_error" and any(e in r.stderr for e in ("SyntaxError", "IndentationError", "TabError")):
        return "compile_error"
    return r.status


def grade_test(code: str, test: Test, run, limits: Limits) -> tuple[bool, str]:
    """(passed, reason) of ``code`` on one test, run with executor ``run(code, stdin, limits)``."""
    kind = test["kind"]
    if kind == "stdio":
        r = run(code, test["input"], limits)
        ok = r.status == "ok" and _norm(r.stdout) == _norm(test["output"])
    elif kind == "call":
        r = run(code + "\n" + _CALL.format(fn=test["fn"]), json.dumps(test["args"]), limits)
        got = r.stdout.rsplit("<<rspo-result>>", 1)
        try:
            ok = r.status == "ok" and len(got) == 2 and json.loads(got[1]) == json.loads(json.dumps(test["expected"]))
        except json.JSONDecodeError:
            ok = False
    elif kind == "assert":
        r = run(code + "\n\n" + test["code"] + "\n", "", limits)
        ok = r.status == "ok"
    else:
        return False, "sandbox_error"
    return ok, "passed" if ok else _failure(r)


# ----------------------------------------------------------------------------------------
# The registered task
# ----------------------------------------------------------------------------------------
@dataclass
class CodeOptions:
    train: list[str] = field(default_factory=list)
    """Training data files (JSONL / Parquet; ``builtin:code/...`` for the shipped sample set)."""
    eval: dict[str, str] = field(default_factory=dict)
    """Evaluation splits: name -> file; the first is the validation split."""
    instruction: str = DEFAULT_INSTRUCTION
    """Appended to each problem (verl-format chat prompts are used as given)."""
    prompt_format: Literal["chat", "text"] = "chat"
    """Prompts as chat messages (the model's chat template) or plain text."""
    max_new_tokens: int = 1024
    """Response length limit."""
    partial_credit: bool = False
    """Reward = share of tests passed (else 1 only if all pass, the common recipes' choice)."""
    wall_s: float = 4.0
    """Wall-clock seconds per test run."""
    cpu_s: int = 3
    """CPU seconds per test run."""
    memory_mb: int = 512
    """Address space per test run, MiB."""
    output_kb: int = 256
    """Output cap per test run, KiB."""
    parallel: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Programs run at once (default: the number of cores)."""
    executor: Literal["local", "sandbox_fusion"] = "local"
    """local: rspo.sandbox on this machine; sandbox_fusion: a SandboxFusion server at sandbox_fusion_url."""
    sandbox_fusion_url: str | None = None
    """Base URL of the SandboxFusion server (executor=sandbox_fusion)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.parallel < 1:
            raise ValueError("task.options.max_new_tokens and parallel must be >= 1")
        Limits(wall_s=self.wall_s, cpu_s=self.cpu_s, memory_mb=self.memory_mb, output_kb=self.output_kb)
        if (self.executor == "sandbox_fusion") != bool(self.sandbox_fusion_url):
            raise ValueError("task.options.sandbox_fusion_url goes with executor=sandbox_fusion (and only with it)")
        for path in [*self.train, *self.eval.values()]:
            resolve_path(path)


@register_task
class CodeTask(FileTask):
    """Code RLVR: programs from responses, run on tests in a sandbox (see the module docstring)."""

    name = "code"
    reasons = REASONS
    Options = CodeOptions

    def __init__(self, options: CodeOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        self.limits = Limits(wall_s=o.wall_s, cpu_s=o.cpu_s, memory_mb=o.memory_mb, output_kb=o.output_kb)
        self._executor = None

    def __getstate__(self) -> dict:  # sent to scoring workers: the executor (a semaphore) is made there
        return {**self.__dict__, "_executor": None}

    @property
    def executor(self):
        if self._executor is None:
            o = self.options
            self._executor = (
                SandboxFusion(o.sandbox_fusion_url) if o.executor == "sandbox_fusion" else LocalSandbox(o.parallel)
            )
        return self._executor

    def load(self, path: str) -> list[CodeExample]:
        return load_examples(path, self.options.instruction, self.options.prompt_format)

    def reference(self, example: CodeExample) -> str | None:
        return None if example.solution is None else f"```python\n{example.solution}\n```"

    def grade(self, code: str, example: CodeExample) -> list[tuple[bool, str]]:
        """(passed, reason) per test; every test is run (``partial_credit``), else until the first failure
        in test order (tests run ``parallel`` at a time)."""
        tests, run = example.tests, self.executor.run
        width = max(1, min(self.options.parallel, len(tests)))
        results: list[tuple[bool, str]] = []
        with ThreadPoolExecutor(width) as pool:
            for start in range(0, len(tests), width):
                batch = tests[start : start + width]
                results += list(pool.map(lambda t: grade_test(code, t, run, self.limits), batch))
                if not self.options.partial_credit and not all(ok for ok, _ in results):
                    break
        return results

    def verdict(self, response: str, example: CodeExample) -> Verdict:
        code = last_code_block(response)
        if code is None:
            return Verdict(0.0, "no_code", False)
        results = self.grade(code, example)
        passed = sum(ok for ok, _ in results)
        all_ok = passed == len(example.tests)
        reason = "passed" if all_ok else next(why for ok, why in results if not ok)
        reward = passed / len(example.tests) if self.options.partial_credit else float(all_ok)
        return Verdict(reward, reason, all_ok)

    def record(self, example: CodeExample) -> dict:
        return {"id": example.id, "source": example.source, "tests": len(example.tests)}
