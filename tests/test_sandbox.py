"""The code task and its sandbox: hostile programs (each ends with reward 0 and the right reason, the run goes on,
nothing outside the sandbox changes, bounded time), the shipped sample set graded correctly, data formats,
parallel runs, and the SandboxFusion client against a local fake server."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from rspo.config import ConfigError
from rspo.sandbox import Limits, isolation, run_python
from rspo.tasks import make_task
from rspo.tasks.code import last_code_block, load_examples

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = "builtin:code/sample.jsonl"


@pytest.fixture(scope="module")
def task():
    return make_task("code", {"eval": {"s": SAMPLE}, "wall_s": 3.0, "cpu_s": 2})


@pytest.fixture(scope="module")
def add(task):  # "Read two integers a and b on one line and print their sum."
    return next(e for e in task.eval_examples("s") if e.id == "io-sum")


# what a program could not reach anyway, or what is rebuilt (virtual environments, the docs site, run output, and
# the package metadata pip rewrites: `.ci/run` builds the peer environments while this suite runs)
PROJECT_SKIP = (
    ".git",
    ".venv",
    ".venv-verl",
    ".venv-megatron",
    "rspo.egg-info",
    "build",
    "runs",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
)


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part in skip for part in p.parts):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def answer(code: str) -> str:
    return f"Here is my program.\n```python\n{code}\n```\n"


def test_isolation_layers_present():
    layers = isolation()
    assert layers[:3] == ["rlimits", "wall-clock kill of the process group", "subreaper: no surviving process"]
    print("active isolation layers:", *layers, sep="\n  ")


def test_a_plain_program_runs():
    r = run_python("print(sum(map(int, input().split())))", stdin="2 3\n")
    assert (r.status, r.stdout, r.returncode) == ("ok", "5\n", 0) and r.wall_s < 5


def test_a_virtual_environment_under_tmp_works(tmp_path):
    """The trainer's interpreter may live under /tmp (a fresh clone's venv there: CI did this), which the
    private /tmp hides: programs run with the real interpreter behind the venv's link."""
    import subprocess
    import sys
    import venv

    venv.EnvBuilder(symlinks=True, with_pip=False, system_site_packages=True).create(tmp_path / "venv")
    py = tmp_path / "venv" / "bin" / "python"
    code = "from rspo.sandbox import run_python; r = run_python('print(2 + 3)'); print(r.status, r.stdout.strip())"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["ok", "5"], out.stdout + out.stderr


def test_private_dirs_keep_an_interpreter_installed_under_them(monkeypatch):
    from rspo import sandbox

    assert "/tmp" in sandbox._private_dirs() or os.path.realpath(sys.base_prefix).startswith("/tmp/")
    monkeypatch.setattr(sandbox, "_interpreter", lambda: "/tmp/x/venv/bin/python3")  # a venv made with --copies
    assert "/tmp" not in sandbox._private_dirs() and "/dev/shm" in sandbox._private_dirs()


def _pwned(tag: str) -> list[Path]:
    return [Path("/tmp") / f"rspo-pwned-{tag}", Path.home() / f"rspo-pwned-{tag}", ROOT / f"rspo-pwned-{tag}"]


# fmt: off
HOSTILE = {  # name: (program, the reasons it may end with)
    "infinite_loop": ("while True:\n    pass", {"timeout"}),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", {"runtime_error"}),
    "allocate_50_gb": ("x = bytearray(50 * 2**30)", {"memory"}),
    "write_10_gb_file": ("f = open('big.bin', 'wb')\nfor _ in range(10 * 1024):\n    f.write(b'0' * 2**20)",
                         {"runtime_error"}),
    "write_outside": ("import pathlib\nfor p in {paths}:\n    try:\n        pathlib.Path(p).write_text('x')\n"
                      "    except OSError as e:\n        print(e)\nprint(7)", {"wrong_answer"}),
    "read_env_secrets": ("import os\nprint(dict(os.environ))", {"wrong_answer"}),
    "socket_to_local_server": ("import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                               "s.sendall(b'stolen')\nprint(3)", {"runtime_error"}),
    "kill_parent": ("import os, signal\nfor pid in (os.getppid(), {me}):\n    try:\n"
                    "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nprint(3)",
                    {"wrong_answer"}),
    "os_system_and_subprocess": ("import os, subprocess\nos.system('touch {pwned0}')\n"
                                 "subprocess.run(['rm', '-f', '{victim}'])\nprint(4)", {"wrong_answer"}),
    "print_1_gb": ("import sys\nfor _ in range(1024 * 1024):\n    sys.stdout.write('x' * 1024)", {"wrong_answer"}),
    "close_stdout": ("import os\nos.close(1)\nprint(3)", {"runtime_error"}),
    "chdir_and_delete": ("import os, shutil\nos.chdir('{victim_dir}')\n"
                         "shutil.rmtree('{victim_dir}', ignore_errors=True)\nprint(os.listdir('.'))",
                         {"runtime_error"}),
    "sleep_past_limit": ("import time\ntime.sleep(60)", {"timeout"}),
    "daemon_left_behind": ("import subprocess\nsubprocess.Popen(['sleep', '987654'], start_new_session=True)\n"
                           "print(3)", {"wrong_answer"}),
}
# fmt: on


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program(task, add, tmp_path, name):
    """The program answers "a b -> a + b" badly on purpose; it must end with reward 0 and the stated reason,
    change nothing outside its sandbox, take bounded time, leave no process behind, and leave this process
    (its grandparent, which it tries to kill) alive."""
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("precious")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    before_project = tree_digest(
        ROOT,
        skip=PROJECT_SKIP,
    )
    before_tmp = tree_digest(tmp_path)
    pwned = _pwned(name)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    os.environ["RSPO_TEST_SECRET_TOKEN"] = "s3cr3t-token-value"
    code, reasons = HOSTILE[name]
    code = code.format(
        paths=[str(p) for p in pwned],
        port=server.getsockname()[1],
        me=os.getpid(),
        pwned0=pwned[0],
        victim=victim,
        victim_dir=victim_dir,
    )
    t0 = time.monotonic()
    try:
        v = task.verdict(answer(code), add)
    finally:
        del os.environ["RSPO_TEST_SECRET_TOKEN"]
    wall = time.monotonic() - t0
    connected = True
    try:
        server.accept()
    except TimeoutError:
        connected = False
    server.close()
    assert v.reason in reasons, (name, v)
    assert v.reward == 0.0 and not v.correct, v
    assert wall < 30, wall  # three tests of at most 3 s each, plus start-up
    assert not connected, "the program reached a server on 127.0.0.1"
    assert not any(p.exists() for p in pwned), [p for p in pwned if p.exists()]
    assert tree_digest(tmp_path) == before_tmp
    assert (
        tree_digest(
            ROOT,
            skip=PROJECT_SKIP,
        )
        == before_project
    )
    survivors = [p for p in os.listdir("/proc") if p.isdigit() and b"987654" in _cmdline(p)]
    assert not survivors, survivors


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_secrets_do_not_reach_the_program():
    os.environ["RSPO_TEST_SECRET_TOKEN"] = "s3cr3t-token-value"
    try:
        r = run_python("import os\nprint(sorted(os.environ))\nprint(open('/proc/1/environ').read())")
    finally:
        del os.environ["RSPO_TEST_SECRET_TOKEN"]
    assert "s3cr3t" not in r.stdout and "RSPO_TEST_SECRET_TOKEN" not in r.stdout


def test_sample_set_is_graded_correctly(task):
    """Every reference solution passes, every deliberately wrong one fails (36 problems, all test forms)."""
    rows = [json.loads(x) for x in (ROOT / "src/rspo/tasks/data/code/sample.jsonl").read_text().splitlines()]
    examples = task.eval_examples("s")
    assert len(examples) == len(rows) == 36
    kinds = {t["kind"] for e in examples for t in e.tests}
    assert kinds == {"stdio", "call", "assert"}
    for ex, row in zip(examples, rows, strict=True):
        good, bad = task.verdict(answer(row["solution"]), ex), task.verdict(answer(row["wrong"]), ex)
        assert good.correct and good.reward == 1.0 and good.reason == "passed", (ex.id, good)
        assert not bad.correct and bad.reward == 0.0 and bad.reason in ("wrong_answer", "runtime_error"), (ex.id, bad)


def test_partial_credit_and_reasons(tmp_path):
    t = make_task("code", {"eval": {"s": SAMPLE}, "partial_credit": True})
    ex = next(e for e in t.eval_examples("s") if e.id == "io-fib")  # 0 -> 0, 10 -> 55, 60 -> 1548008755920
    v = t.verdict(answer("n = int(input())\nprint(0 if n == 0 else 55)"), ex)
    assert v.reward == pytest.approx(2 / 3) and v.reason == "wrong_answer" and not v.correct
    assert t.verdict("I cannot solve this.", ex).reason == "no_code"
    assert t.verdict(answer("print(1"), ex).reason == "compile_error"
    assert t.verdict(answer("raise ValueError"), ex).reason == "runtime_error"


def test_last_code_block():
    text = "```python\nprint(1)\n```\nthen\n```\nprint(2)\n```\n```bash\nrm -rf /\n```"
    assert last_code_block(text) == "print(2)\n"  # the last python (or bare) block; other languages skipped
    assert last_code_block("no fences") is None
    assert last_code_block("```py3 extra\nx = 1\n```") is None  # an unknown language tag


@pytest.mark.parametrize(
    ("row", "kind", "n"),
    [
        ({"question": "q", "input_output": json.dumps({"inputs": ["1\n"], "outputs": ["1\n"]})}, "stdio", 1),
        ({"question": "q", "input_output": {"inputs": [[1, 2]], "outputs": [3], "fn_name": "f"}}, "call", 1),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "reward_model": {"ground_truth": json.dumps({"inputs": ["a", "b"], "outputs": ["a", "b"]})},
            },
            "stdio",
            2,
        ),
        ({"problem": "q", "test_list": ["assert f(1) == 1", "assert f(2) == 2"]}, "assert", 2),
        ({"prompt": "def f(x):", "test": "def check(c):\n    assert c(1) == 1", "entry_point": "f"}, "assert", 1),
    ],
    ids=["apps-json", "leetcode-call", "verl", "mbpp", "humaneval"],
)
def test_data_formats(tmp_path, row, kind, n):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(row) + "\n")
    (ex,) = load_examples(str(f))
    assert len(ex.tests) == n and {t["kind"] for t in ex.tests} == {kind}


def test_bad_rows_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "q", "inputs": ["1"], "outputs": ["1"]}\n{"problem": "q"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: no tests"):
        load_examples(str(f))
    f.write_text('{"problem": "q", "inputs": ["1", "2"], "outputs": ["1"]}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: 'inputs' and 'outputs' must be non-empty and of equal"):
        load_examples(str(f))
    with pytest.raises(ConfigError, match="sandbox_fusion_url goes with executor=sandbox_fusion"):
        make_task("code", {"executor": "sandbox_fusion"})


def test_parallel_runs_are_independent_and_faster():
    from concurrent.futures import ThreadPoolExecutor

    codes = [f"import time\ntime.sleep(0.5)\nprint({i} * 2)" for i in range(8)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: run_python(c, limits=Limits(wall_s=5)), codes))
    wall = time.monotonic() - t0
    assert [r.stdout for r in results] == [f"{2 * i}\n" for i in range(8)]
    assert wall < 8 * 0.5  # four at a time: about 1 s of sleeping, not 4


class _FakeSandboxFusion(http.server.BaseHTTPRequestHandler):
    """A stand-in for a SandboxFusion server: POST /run_code, answered by running the code in rspo's sandbox."""

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/run_code" and req["language"] == "python"
        r = run_python(req["code"], req.get("stdin", ""), Limits(wall_s=float(req["run_timeout"])))
        status = {"ok": "Finished", "timeout": "TimeLimitExceeded"}.get(r.status, "Finished")
        body = {
            "status": "Success" if r.status == "ok" else "Failed",
            "message": "",
            "run_result": {
                "status": status,
                "execution_time": r.wall_s,
                "return_code": r.returncode,
                "stdout": r.stdout,
                "stderr": r.stderr,
            },
        }
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_sandbox_fusion_executor_against_a_local_fake_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeSandboxFusion)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        t = make_task(
            "code", {"eval": {"s": SAMPLE}, "executor": "sandbox_fusion", "sandbox_fusion_url": url, "wall_s": 2.0}
        )
        rows = {
            json.loads(x)["id"]: json.loads(x)
            for x in (ROOT / "src/rspo/tasks/data/code/sample.jsonl").read_text().splitlines()
        }
        for ex in t.eval_examples("s")[:6] + [e for e in t.eval_examples("s") if e.id.startswith(("fn-", "mbpp-"))][:2]:
            assert t.verdict(answer(rows[ex.id]["solution"]), ex).correct, ex.id
            assert t.verdict(answer(rows[ex.id]["wrong"]), ex).reason == "wrong_answer", ex.id
        ex = t.eval_examples("s")[0]
        assert t.verdict(answer("import time\ntime.sleep(30)"), ex).reason == "timeout"
    finally:
        server.shutdown()
    dead = make_task(
        "code", {"eval": {"s": SAMPLE}, "executor": "sandbox_fusion", "sandbox_fusion_url": "http://127.0.0.1:9"}
    )
    assert dead.verdict(answer("print(3)"), dead.eval_examples("s")[0]).reason == "sandbox_error"


def test_code_task_trains_and_evaluates(family_dirs, tmp_path):
    """configs/code-tiny.yaml runs (a few steps, shortened here) and `rspo eval task.name=code` reports pass@k."""
    from rspo.cli import main
    from rspo.config import load_config
    from rspo.rundir import read_metrics
    from rspo.train_config import TrainConfig
    from rspo.trainer import Trainer

    overrides = ["steps=2", "eval_every=2", "eval_problems=4", f"out_dir={tmp_path / 'run'}", "threads=1"]
    overrides += ["rollout.prompts_per_step=4", "mini_batch_size=8", "task.options.max_new_tokens=24"]
    cfg = load_config(TrainConfig, ROOT / "configs" / "code-tiny.yaml", overrides)
    Trainer(cfg, progress=False).train()
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2] and "val/accuracy" in rows[-1]
    assert rows[-1]["reward/errors"] == 0  # every verdict came back (no_code here), none failed
    out = tmp_path / "ev"
    args = ["task.name=code", f"task.options.eval.sample={SAMPLE}", "n=2", "limit=3", "max_new_tokens=8", "threads=1"]
    assert main(["eval", f"model={family_dirs['tiny-qwen3-moe']}", *args, f"out_dir={out}"]) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert set(res["sample"]) == {"examples", "greedy_pass@1", "avg@2", "pass@2"} and res["sample"]["examples"] == 3
    reasons = {json.loads(x)["reason"] for x in (out / "responses-sample.jsonl").read_text().splitlines()}
    assert reasons <= {"no_code", "compile_error", "runtime_error", "wrong_answer", "passed"}
