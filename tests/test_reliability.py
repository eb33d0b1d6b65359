"""Nothing lost, nothing executed: run directories, crash windows, safe checkpoint loading, input checks
before anything is written, numerics of padding, hostile rewards and verifier inputs (issue 11).

The crash-window tests kill a real `rspo train` process (SIGKILL, via RSPO_CRASH_AT) at each point of
the checkpoint swap and of a metrics write, resume it, and compare every logged metric with an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rspo.cli import main
from rspo.config import ConfigError, build, load_config, save_config
from rspo.errors import CheckpointError, ModelError, RunDirError
from rspo.rundir import MARKER, RunDir, read_metrics
from rspo.train_config import TrainConfig
from rspo.trainer import Trainer
from tests.test_trainer import TIMING, tiny_cfg

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its content (to prove nothing changed)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def foreign_dir(path: Path) -> Path:
    """A directory of the user's, with a file and a sub-directory named like ours (checkpoint/)."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "checkpoint" / "precious.bin").write_bytes(b"\x00" * 100)
    (path / "notes.txt").write_text("my notes\n")
    return path


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rspo.cli", *args], env=env or ENV, capture_output=True, text=True, timeout=timeout
    )


def one_error_line(stderr: str, command: str) -> str:
    """The one error line (progress bars of a model load that came first aside)."""
    lines = [x for x in stderr.splitlines() if x.strip() and not x.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith(f"rspo {command}: error: "), stderr[-2000:]
    assert "Traceback" not in stderr
    return lines[0]


# ----------------------------------------------------------------------------------------
# Run directories: no foreign directory is written to
# ----------------------------------------------------------------------------------------
def test_rundir_rules(tmp_path):
    new = RunDir.create(tmp_path / "a" / "b", "train")  # created with parents
    assert (tmp_path / "a" / "b" / MARKER).is_file() and new.path.is_dir()
    (tmp_path / "empty").mkdir()
    RunDir.create(tmp_path / "empty", "train")  # an empty directory loses nothing
    foreign = foreign_dir(tmp_path / "foreign")
    before = tree_digest(foreign)
    with pytest.raises(RunDirError, match=r"foreign is not empty and was not created by rspo .* nothing was changed"):
        RunDir.create(foreign, "train", overwrite=True)  # even with overwrite
    assert tree_digest(foreign) == before and not (foreign / MARKER).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is not a directory"):
        RunDir.create(tmp_path / "file", "train")
    with pytest.raises(RunDirError, match="holds an rspo train run, not a pretrain run"):
        RunDir.create(new.path, "pretrain", overwrite=True)
    # its own earlier output: refused without the flag; with it, only the entries it wrote go
    new.write_text("config.yaml", "a: 1\n")
    (new.path / "user-file.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="already holds a train run; use --resume .* --overwrite to replace it"):
        RunDir.create(new.path, "train")
    RunDir.create(new.path, "train", overwrite=True)
    assert not (new.path / "config.yaml").exists() and (new.path / "user-file.txt").read_text() == "keep me"
    assert json.loads((new.path / MARKER).read_text())["entries"] == []
    # a damaged marker is an error, never guessed around
    (new.path / MARKER).write_text("{not json")
    with pytest.raises(RunDirError, match="is damaged"):
        RunDir.create(new.path, "train", overwrite=True)


def test_rundir_lock_refuses_a_second_writer(tmp_path):
    run = RunDir.create(tmp_path / "r", "train")
    run.lock()
    other = RunDir.existing(tmp_path / "r", "train")
    with pytest.raises(RunDirError, match="in use by another rspo process"):
        other.lock()
    run.close()
    other.lock()  # free again
    other.close()


def test_demo_and_pretrain_refuse_foreign_directories(tmp_path):
    """`rspo demo --out-dir .` used to empty the current directory; `rspo pretrain out_dir=DIR` deleted DIR."""
    foreign = foreign_dir(tmp_path / "mine")
    before = tree_digest(foreign)
    r = subprocess.run(
        [sys.executable, "-m", "rspo.cli", "demo", "out_dir=.", "--overwrite"],
        cwd=foreign,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "not created by rspo" in one_error_line(r.stderr, "demo")
    r = cli("pretrain", f"out_dir={foreign}", "steps=1", "--overwrite")
    assert r.returncode == 2 and "nothing was changed" in one_error_line(r.stderr, "pretrain")
    assert tree_digest(foreign) == before and not (foreign / MARKER).exists()


def test_train_refuses_a_directory_it_did_not_write(tiny_policy, tmp_path):
    """`rspo train out_dir=DIR` used to delete a checkpoint/ folder it did not write."""
    foreign = foreign_dir(tmp_path / "run")
    before = tree_digest(foreign)
    cfg = tmp_path / "c.yaml"
    save_config(tiny_cfg(tiny_policy, foreign, steps=1), cfg)
    for extra in ([], ["--overwrite"]):
        r = cli("train", str(cfg), *extra)
        assert r.returncode == 2 and "not created by rspo" in one_error_line(r.stderr, "train")
    r = cli("train", "--resume", str(foreign))
    assert r.returncode == 2 and "not an rspo train run" in one_error_line(r.stderr, "train")
    assert tree_digest(foreign) == before


def test_overwrite_replaces_only_its_own_run(tiny_policy, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_cfg(tiny_policy, run, steps=1), progress=False).train()
    (run / "analysis.ipynb").write_text("{}")
    with pytest.raises(RunDirError, match="already holds a train run"):
        Trainer(tiny_cfg(tiny_policy, run, steps=1), progress=False)
    Trainer(tiny_cfg(tiny_policy, run, steps=2), progress=False, overwrite=True).train()
    assert [r["step"] for r in read_metrics(run)] == [1, 2] and (run / "analysis.ipynb").read_text() == "{}"


# ----------------------------------------------------------------------------------------
# Untrusted code on resume
# ----------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint could do with weights_only=False."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_crafted_checkpoint_file_runs_no_code(tiny_policy, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_cfg(tiny_policy, run, steps=1), progress=False).train()
    ckpt = run / "checkpoint"
    marker = tmp_path / "PWNED"
    torch.save({"optimizer": _Payload(marker), "torch_rng": torch.get_rng_state()}, ckpt / "trainer.pt")
    torch.load(ckpt / "trainer.pt", weights_only=False)  # the payload is real: unsafe loading runs it
    assert marker.exists()
    marker.unlink()
    manifest = json.loads((ckpt / "manifest.json").read_text())  # a careful attacker fixes the manifest too
    manifest["files"]["trainer.pt"] = (ckpt / "trainer.pt").stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"trainer.pt cannot be loaded safely \(weights_only=True\)"):
        Trainer(tiny_cfg(tiny_policy, run, steps=2), resume=True, progress=False)
    r = cli("train", "--resume", str(run), "steps=2")
    assert r.returncode == 2 and "weights_only=True" in one_error_line(r.stderr, "train")
    assert not marker.exists()


def test_damaged_trainer_state_and_metrics_name_the_file(tiny_policy, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_cfg(tiny_policy, run, steps=1), progress=False).train()
    state_file = run / "checkpoint" / "trainer_state.json"
    good = state_file.read_text()
    state = json.loads(good)
    del state["data_pos"]
    state_file.write_text(json.dumps(state))
    manifest = json.loads((run / "checkpoint" / "manifest.json").read_text())
    manifest["files"]["trainer_state.json"] = state_file.stat().st_size
    (run / "checkpoint" / "manifest.json").write_text(json.dumps(manifest))
    r = cli("train", "--resume", str(run), "steps=2")
    assert r.returncode == 2 and "trainer_state.json lacks ['data_pos']" in one_error_line(r.stderr, "train")
    # a changed file without a matching manifest is corruption, reported, not silently discarded
    state_file.write_text(good + " ")
    r = cli("train", "--resume", str(run), "steps=2")
    assert r.returncode == 2 and "is corrupt: trainer_state.json" in one_error_line(r.stderr, "train")
    # a damaged line in the middle of metrics.jsonl names the file and the line
    m = run / "metrics.jsonl"
    m.write_text('{"step": 1}\n{"step": 2, broken\n{"step": 3}\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(run)
    m.write_text('{"step": 1}\n{"step": 2, "x": 1')  # a torn last line is dropped
    assert read_metrics(run) == [{"step": 1}]


# ----------------------------------------------------------------------------------------
# Crash windows: a real process killed in each, then resumed
# ----------------------------------------------------------------------------------------
CRASH_OVER = {"steps": 5, "checkpoint_every": 2, "eval_every": 2, "eval_problems": 4, "objective__name": "rspo"}


@pytest.fixture(scope="module")
def straight_run(tiny_policy, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("straight") / "run"
    Trainer(tiny_cfg(tiny_policy, out, **CRASH_OVER), progress=False).train()
    return read_metrics(out)


def strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


# (crash point, what is on disk after the kill): checkpoints at steps 2, 4, 5; metrics rows 0..5
WINDOWS = {
    "step_logged@1": "killed after step 1, before the first checkpoint: resume starts again from step 0",
    "checkpoint_partial@1": "killed while writing the first checkpoint (no manifest yet)",
    "metrics_torn@4": "killed half-way through writing step 3's metrics line (after the step-2 checkpoint)",
    "checkpoint_partial@2": "checkpoint.tmp (step 4) torn, checkpoint (step 2) complete",
    "checkpoint_written@2": "checkpoint.tmp (step 4) complete, checkpoint (step 2) complete, before the swap",
    "checkpoint_between_renames@2": "checkpoint.old (step 2) and checkpoint.tmp (step 4), no checkpoint",
    "checkpoint_swapped@2": "checkpoint (step 4) and checkpoint.old (step 2)",
}


@pytest.mark.parametrize("window", list(WINDOWS))
def test_kill_in_each_window_then_resume_matches_uninterrupted(tiny_policy, tmp_path, straight_run, window):
    run = tmp_path / "run"
    cfg_file = tmp_path / "cfg.yaml"
    save_config(tiny_cfg(tiny_policy, run, **CRASH_OVER), cfg_file)
    r = cli("train", str(cfg_file), env={**ENV, "RSPO_CRASH_AT": window})
    assert r.returncode == -signal.SIGKILL, (window, r.stderr[-2000:])
    if window == "checkpoint_between_renames@2":
        assert not (run / "checkpoint").exists() and (run / "checkpoint.old").is_dir()
    if window.startswith("metrics_torn"):
        assert not (run / "metrics.jsonl").read_text().endswith("\n")  # really torn
    r = cli("train", "--resume", str(run))
    assert r.returncode == 0, (window, r.stderr[-3000:])
    assert strip_timing(read_metrics(run)) == strip_timing(straight_run), window
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_external_kill_during_checkpoint_writes_recovers(tiny_policy, tmp_path, straight_run):
    """A SIGKILL from outside at a random moment (as a user or the OOM killer would), repeated until one
    lands while a checkpoint is being written, then resumed: the metrics equal an uninterrupted run."""
    cfg_file = tmp_path / "cfg.yaml"
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        save_config(tiny_cfg(tiny_policy, run, **CRASH_OVER), cfg_file)
        proc = subprocess.Popen(
            [sys.executable, "-m", "rspo.cli", "train", str(cfg_file)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (run / "checkpoint.tmp").exists():
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        r = cli("train", "--resume", str(run))
        assert r.returncode == 0, r.stderr[-3000:]
        assert strip_timing(read_metrics(run)) == strip_timing(straight_run)


# ----------------------------------------------------------------------------------------
# Validation before anything is written
# ----------------------------------------------------------------------------------------
BAD_VALUES = [
    ({"objective": {"name": "grpo", "clip_low": 1.0}}, r"objective 'grpo': objective.clip_low must be < 1 for 'grpo'"),
    ({"objective": {"name": "gmpo", "clip_high": -0.1}}, r"'gmpo': objective.clip_high must be a finite number >= 0"),
    ({"objective": {"name": "gspo", "clip_low": 1.5}}, r"objective.clip_low must be < 1 for 'gspo'"),
    ({"router_shift": {"clip_threshold": 0.0}}, r"router_shift.clip_threshold: must be in \(0, 1\]"),
    ({"router_shift": {"clip_threshold": 1.5}}, r"router_shift.clip_threshold: must be in \(0, 1\]"),
    ({"router_shift": {"gamma_min": 0.0}}, r"router_shift.gamma_min: must be in \(0, 1\]"),
    ({"router_shift": {"gamma_min": 1.2}}, r"router_shift.gamma_min: must be in \(0, 1\]"),
    ({"router_shift": {"top_k": 0}}, r"router_shift.top_k: must be >= 1"),
    ({"optim": {"lr": math.inf}}, r"optim.lr must be a finite number, got inf"),
    ({"optim": {"lr": math.nan}}, r"optim.lr must be a finite number, got nan"),
    ({"task": {"options": {"score_correct": math.inf}}}, r"task.options.score_correct must be a finite number"),
    ({"task": {"options": {"score_format": math.nan}}}, r"task.options.score_format must be a finite number"),
    ({"checkpoint_every": 0}, r"checkpoint_every must be >= 1"),
    ({"eval_every": -1}, r"eval_every must be >= 1, or 0 for no validation"),
    ({"kl_coef": -0.1}, r"kl_coef >= 0"),
    ({"scoring": {"timeout_s": 0}}, r"scoring.timeout_s: must be > 0"),
    ({"routing": {"aux_loss_coef": -1.0}}, r"routing.aux_loss_coef must be >= 0"),
    ({"optim": {"weight_decay": -0.01}}, r"weight_decay >= 0"),
]


@pytest.mark.parametrize(("data", "match"), BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_bad_config_values_fail_when_built(data, match):
    with pytest.raises(ConfigError, match=match):
        build(TrainConfig, data)


def test_yaml_infinities_and_alias_bomb_are_short_errors(tmp_path):
    f = tmp_path / "inf.yaml"
    f.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match="optim.lr must be a finite number, got inf"):
        load_config(TrainConfig, f)
    f.write_text("rollout:\n  temperature: .nan\n")
    with pytest.raises(ConfigError, match="rollout.temperature must be a finite number, got nan"):
        load_config(TrainConfig, f)
    # a YAML alias bomb: 9 levels of 9 references, 9^9 strings if expanded (its repr would be gigabytes)
    levels = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = f"[{', '.join(levels)}]"
    from rspo.lab.study import StudyConfig

    for cls, text in (
        (TrainConfig, f"steps: {bomb}\n"),
        (TrainConfig, f"objective: {bomb}\n"),
        (StudyConfig, f"arms: {{a: {bomb}}}\n"),
        (StudyConfig, f"common: {bomb}\n"),
    ):
        f.write_text(text)
        t0 = time.time()
        with pytest.raises(ConfigError) as err:
            load_config(cls, f)
        assert len(str(err.value)) < 600 and time.time() - t0 < 10, str(err.value)[:1000]


def test_trainer_checks_before_writing(tiny_policy, tmp_path):
    """A router top-k beyond the model's experts is found when the model is loaded, before the run directory
    is created; a dense model is one clear error naming the model class."""
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"router_shift.top_k=9: top_k must be in \[1, 8\]"):
        Trainer(tiny_cfg(tiny_policy, run, router_shift__top_k=9), progress=False)
    assert not run.exists()
    dense = tmp_path / "dense"
    _save_dense_model(dense)
    cfg = tmp_path / "c.yaml"
    save_config(tiny_cfg(str(dense), run), cfg)
    r = cli("train", str(cfg))
    line = one_error_line(r.stderr, "train")
    assert r.returncode == 2 and "Qwen3ForCausalLM is a dense model (no MoE router): router shift needs" in line
    assert not run.exists()


def _save_dense_model(path: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rspo.lab.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def test_model_directory_errors_are_one_line(tmp_path):
    d = tmp_path / "m"
    _save_dense_model(d)
    (d / "model.safetensors").unlink()
    r = cli("eval", f"model={d}", "limit=1")
    assert r.returncode == 2 and "has no model weights" in one_error_line(r.stderr, "eval")
    _save_dense_model(d)
    (d / "tokenizer.json").unlink()
    r = cli("eval", f"model={d}", "limit=1")
    assert r.returncode == 2 and "has no tokenizer" in one_error_line(r.stderr, "eval")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_model"}))
    r = cli("eval", f"model={d}", "limit=1")
    assert r.returncode == 2 and "config.json" in one_error_line(r.stderr, "eval")
    with pytest.raises(ModelError, match="does not exist"):
        from rspo.policy import load_policy

        load_policy(tmp_path / "nope")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["limit=0"], "limit: must be >= 1"),
        (["limit=-5"], "limit: must be >= 1"),
        (["threads=0"], "threads: must be >= 1"),
        (["temperature=0"], "temperature: must be a finite number > 0"),
        (["temperature=.nan"], "temperature must be a finite number"),
        (["temperature=.inf"], "temperature must be a finite number"),
        (["top_p=1.5"], "top_p: must be in (0, 1]"),
        (["n=-1"], "n: must be >= 0"),
        (["splits=[nope]"], "split 'nope' is not a split of task 'countdown'"),
    ],
)
def test_eval_arguments_out_of_range(args, match, capsys):
    assert main(["eval", "model=x", *args]) == 2
    assert match in capsys.readouterr().err


def test_pretrain_config_checks():
    from rspo.lab.pretrain import PretrainConfig

    with pytest.raises(ConfigError, match="preset='qwen3-moe-countdwn' is not a model preset; valid: qwen3-moe"):
        build(PretrainConfig, {"preset": "qwen3-moe-countdwn"})
    for size in (0, -1, 10**7):
        with pytest.raises(ConfigError, match=r"shuffle_buffer must be in \[1, 1000000\]"):
            build(PretrainConfig, {"shuffle_buffer": size})


# ----------------------------------------------------------------------------------------
# Numerics: padding never reaches the loss or its gradient
# ----------------------------------------------------------------------------------------
OBJECTIVES = [
    ("grpo", {}),
    ("grpo", {"loss_agg": "token-mean"}),
    ("grpo", {"loss_agg": "seq-mean-token-sum-norm", "norm_length": 5.0}),
    ("gspo", {}),
    ("gspo_token", {}),
    ("gmpo", {}),
    ("rspo", {}),
    ("rspo", {"router_shift_placement": "before_clip"}),
    ("grpo", {"router_shift_placement": "after_clip"}),
    ("gspo", {"router_shift_placement": "before_clip"}),
]


@pytest.mark.parametrize(("name", "hp"), OBJECTIVES, ids=[f"{n}-{h}" for n, h in OBJECTIVES])
@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_non_finite_padding_does_not_reach_loss_or_gradient(name, hp, poison):
    from rspo.objectives import compute_policy_loss, get_objective

    g = torch.Generator().manual_seed(0)
    b, t = 4, 5
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    new = old + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    gamma = 0.5 + 0.5 * torch.rand(b, t, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.float64)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    mask[3, :] = 0  # a sequence with no response token at all
    use_rs = get_objective(name).router_shift == "required" or "router_shift_placement" in hp

    def run(fill: float):
        pad = mask == 0
        lp = new.masked_fill(pad, fill).requires_grad_(True)
        loss, _ = compute_policy_loss(
            name,
            lp,
            old.masked_fill(pad, fill),
            adv.masked_fill(pad, fill),
            mask,
            router_shift=gamma.masked_fill(pad, fill) if use_rs else None,
            **hp,
        )
        loss.backward()
        return loss.detach(), lp.grad

    clean_loss, clean_grad = run(0.0)
    loss, grad = run(poison)
    assert torch.isfinite(clean_loss) and torch.equal(loss, clean_loss)
    assert torch.equal(grad, clean_grad) and bool(torch.isfinite(grad).all())
    assert bool((grad[mask == 0] == 0).all())


def test_nan_gamma_on_a_response_token_is_an_error_naming_it():
    from rspo.errors import NonFiniteError
    from rspo.objectives import compute_policy_loss

    lp = torch.zeros(1, 2, dtype=torch.float64)
    gamma = torch.tensor([[1.0, math.nan]], dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"router_shift \(gamma\) is NaN at 1 response tokens"):
        compute_policy_loss("rspo", lp, lp, torch.ones(1, dtype=torch.float64), torch.ones(1, 2), router_shift=gamma)


# ----------------------------------------------------------------------------------------
# Rewards: errors, non-numbers and hangs are counted, the run goes on
# ----------------------------------------------------------------------------------------
def test_score_counts_errors_and_cuts_off_hangs():
    from rspo.scoring import score
    from tests.helpers import bad_reward

    items = list(range(12))
    t0 = time.monotonic()
    out = score(["x"] * 12, items, bad_reward, timeout_s=1.0, workers=2)
    assert time.monotonic() - t0 < 20  # two hanging calls cost about one timeout each, not 600 s
    expect = {0: "ok", 1: "reward_error", 2: "reward_error", 3: "reward_error", 4: "reward_timeout", 5: "reward_error"}
    assert out.reasons == [expect[i % 6] for i in items]
    assert out.rewards == [1.0 if i % 6 == 0 else 0.0 for i in items]
    assert out.errors == 10 and out.timeouts == 2
    assert "finite" in out.messages["reward_error"] or "real number" in out.messages["reward_error"]
    inproc = score(["x"] * 4, [0, 1, 2, 3], bad_reward, timeout_s=None)  # in-process: no hangs here
    assert inproc.reasons == ["ok", "reward_error", "reward_error", "reward_error"]


def test_trainer_run_goes_on_with_a_hanging_reward(tiny_policy, tmp_path):
    import itertools

    from tests.helpers import SometimesHangs

    tr = Trainer(tiny_cfg(tiny_policy, tmp_path / "r", steps=1, scoring__timeout_s=0.5), progress=False)
    first, second = [p.target for p in itertools.islice(tr.task.train_examples(seed=0), 2)]  # the step's prompts
    assert first != second
    tr.task = SometimesHangs(tr.task, hang=first, nan=second)
    tr.train()
    row = read_metrics(tmp_path / "r")[-1]  # 4 responses per prompt: 4 hang, 4 return NaN
    assert row["step"] == 1 and row["reward/timeouts"] == 4 and row["reward/errors"] == 8


def test_unpicklable_reward_function_is_a_clear_error():
    from rspo.scoring import Scorer

    with pytest.raises(ConfigError, match="cannot be sent to a scoring worker .* scoring.timeout_s=null"):
        Scorer(lambda text, item: 1.0).score(["x"], [0])
    assert Scorer(lambda text, item: 1.0, timeout_s=None).score(["x"], [0]).rewards == [1.0]


# ----------------------------------------------------------------------------------------
# Verifier time: any response is scored in linear time
# ----------------------------------------------------------------------------------------
def test_extract_answer_equals_the_regex_on_random_strings():
    import random
    import re

    from rspo.tasks.countdown import extract_answer

    rx = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
    rng = random.Random(0)
    parts = ["<answer>", "</answer>", "<ans", "wer>", "1+2", "\n", "</", "x"]
    for _ in range(3000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))
        found = rx.findall(text)
        assert extract_answer(text) == (found[-1] if found else None), text


@pytest.mark.parametrize(
    "text",
    [
        "<answer>" * 130_000,  # ~1 MB of unclosed tags: quadratic before (minutes)
        "<answer>" + "1+" * 500_000 + "1</answer>",  # a 1 MB answer
        ("<answer>" + "(" * 50) * 20_000 + "</answer>",
        "x" * 1_000_000 + "</answer>" * 10_000,
    ],
    ids=["unclosed-tags", "huge-answer", "nesting", "closers"],
)
def test_countdown_verifier_is_linear_on_megabyte_responses(text):
    from rspo.tasks.countdown import CountdownReward, Problem

    t0 = time.perf_counter()
    v = CountdownReward().verdict(text, Problem((1, 2, 3), 6))
    assert time.perf_counter() - t0 < 2.0  # linear: about 10 ms; the old regex took minutes on the first
    assert v.reward == 0.0 and v.reason in ("no_answer", "unparsable")
