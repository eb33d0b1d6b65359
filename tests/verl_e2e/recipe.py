"""The verl command lines of docs/verl-recipe.md, from one source.

- ``cpu``: verl 0.9.1's own ``main_ppo`` on CPU with the rspo plugin (RSPO on the Countdown testbed model),
  the run ``make test-verl-e2e`` makes: tests/verl_e2e/test_main_ppo.py builds every command it runs here.
- ``paper``: the paper's Qwen3-30B-A3B math run on 8 GPUs with vLLM. Not run by us (no GPU cluster).

    python tests/verl_e2e/recipe.py prepare DIR     # Countdown as verl parquet + the testbed model, in DIR
    python tests/verl_e2e/recipe.py cpu|paper       # print a command
    python tests/verl_e2e/recipe.py --write-docs    # rewrite the snippets docs/verl-recipe.md includes

``make test`` checks that the snippets are current (tests/test_verl_reward.py), so the page cannot drift
from what runs. This module imports nothing of verl: ``make test`` reads it in rspo's own environment.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "snippets"
MODEL_ASSET = ROOT / "src" / "rspo" / "assets" / "countdown-e64k8"
# The testbed model was pretrained on the bare prompt: the chat template renders the user message as is.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
# the paper's RSPO options (section 4.1), the same keys in both commands
RSPO = {"objective": "rspo", "gamma_min": 0.5, "placement": "after_clip"}


@dataclass
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """As a user pastes it: the environment, then one override per line."""
        lines = [f"export {k}={_quote(v)}" for k, v in self.env.items()]
        head, tail = self.argv[:4], self.argv[4:]
        cmd = " ".join(head) + "".join(f" \\\n  {_quote(a)}" for a in tail)
        return "\n".join([*lines, cmd]) + "\n"


def _quote(arg: str) -> str:
    return f'"{arg}"' if "$PWD" in arg else shlex.quote(arg)  # paths under the current directory


def rspo_overrides(objective: str | None = "rspo", **keys: object) -> list[str]:
    """``+actor_rollout_ref.rspo.<key>=...`` (None: plain verl, no plugin section)."""
    if objective is None:
        return []
    opts = {**RSPO, "objective": objective, **keys}
    return [f"+actor_rollout_ref.rspo.{k}={_value(v)}" for k, v in opts.items()]


def _value(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


CPU_ENV = {
    "PYTHONPATH": "$PWD/tests/verl_e2e",  # the CPU shim, imported in every process through verl's own hook
    "VERL_USE_EXTERNAL_MODULES": "verl_cpu",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}


def cpu_command(
    data: str = "$PWD/verl-cpu/data",  # absolute: Ray's workers do not run in this directory
    model: str = "$PWD/verl-cpu/model",
    out: str = "$PWD/verl-cpu/ckpt",
    *,
    objective: str | None = "rspo",
    ranks: int = 1,
    steps: int = 2,
    python: str = "python",
    rspo_keys: dict[str, object] | None = None,
    extra: tuple[str, ...] = (),
) -> Command:
    """The CPU run: 8 prompts x 4 responses per step, mini-batches of 4 prompts (two optimizer steps per
    rollout batch, the second off-policy), ``ranks`` gloo processes on as many fake Ray GPUs."""
    argv = [
        python,
        "-m",
        "verl.trainer.main_ppo",
        "algorithm.adv_estimator=grpo",
        *[
            f"data.train_files={data}/train.parquet",
            f"data.val_files={data}/validation.parquet",
            "data.train_batch_size=8",
            "data.max_prompt_length=32",
            "data.max_response_length=32",
            "data.dataloader_num_workers=0",
            "data.shuffle=false",
        ],
        *[
            f"actor_rollout_ref.model.path={model}",
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",  # (5) no flash-attention
            "actor_rollout_ref.model.enable_gradient_checkpointing=false",
            "actor_rollout_ref.actor.strategy=fsdp2",  # (5) FSDP1 needs GPU tensors
            "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
            "actor_rollout_ref.actor.use_torch_compile=false",
            "actor_rollout_ref.actor.optim.lr=1e-4",
            "actor_rollout_ref.actor.ppo_mini_batch_size=4",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
            "actor_rollout_ref.actor.clip_ratio_low=0.4",
            "actor_rollout_ref.actor.clip_ratio_high=0.4",
            "actor_rollout_ref.actor.use_kl_loss=false",
        ],
        *[
            "actor_rollout_ref.rollout.name=hf",  # (6) the shim's HF generate replica
            "actor_rollout_ref.rollout.n=4",
            "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
            # the old pass in the update's micro-batches: the same rows, the same float32 sums (gamma exactly 1)
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
            "actor_rollout_ref.rollout.agent.num_workers=1",
        ],
        *[
            "reward.num_workers=1",
            "reward.custom_reward_function.path=pkg://rspo.integrations.verl_reward",
            "reward.custom_reward_function.name=compute_score",
            "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",  # (7) 8 never get scheduled
        ],
        *[
            "trainer.device=cpu",
            "trainer.nnodes=1",
            f"trainer.n_gpus_per_node={ranks}",
            f"+ray_kwargs.ray_init.num_gpus={ranks}",  # (2) fake GPUs: verl's worker groups ask for them
            f"ray_kwargs.ray_init.num_cpus={4 + 4 * ranks}",
            f"trainer.total_training_steps={steps}",
            "trainer.val_before_train=false",
            "trainer.test_freq=-1",
            "trainer.save_freq=-1",
            "trainer.logger=[console]",
            "trainer.project_name=rspo_cpu",
            f"trainer.experiment_name={objective or 'grpo'}",
            f"trainer.default_local_dir={out}",
        ],
        *rspo_overrides(objective, **(rspo_keys or {})),
        *extra,
    ]
    return Command(argv, dict(CPU_ENV))


def paper_command() -> Command:
    """The paper's setting (section 4.1, as configs/math-qwen3-30b-a3b.yaml): DeepScaleR, responses up to 8k,
    128 prompts x 8 responses per rollout batch, mini-batches of 64 (two optimizer steps, the second
    off-policy), lr 1e-6, no KL, GMPO's log-space clip of 0.4; vLLM with its log-probs for verl's rollout
    correction."""
    argv = [
        "python",
        "-m",
        "verl.trainer.main_ppo",
        "algorithm.adv_estimator=grpo",
        "data.train_files=/data/deepscaler/train.parquet",
        "data.val_files=[/data/aime24.parquet,/data/amc23.parquet,/data/math500.parquet,/data/minerva.parquet,"
        "/data/olympiadbench.parquet]",
        "data.train_batch_size=128",
        "data.max_prompt_length=1024",
        "data.max_response_length=8192",
        "actor_rollout_ref.model.path=Qwen/Qwen3-30B-A3B",
        "actor_rollout_ref.model.use_remove_padding=true",
        "actor_rollout_ref.model.enable_gradient_checkpointing=true",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.optim.lr=1e-6",
        "actor_rollout_ref.actor.ppo_mini_batch_size=64",
        "actor_rollout_ref.actor.ppo_epochs=1",
        "actor_rollout_ref.actor.use_dynamic_bsz=true",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24576",
        "actor_rollout_ref.actor.clip_ratio_low=0.4",
        "actor_rollout_ref.actor.clip_ratio_high=0.4",
        "actor_rollout_ref.actor.loss_agg_mode=token-mean",
        "actor_rollout_ref.actor.use_kl_loss=false",
        "actor_rollout_ref.actor.entropy_coeff=0",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.n=8",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=4",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        "reward.custom_reward_function.path=pkg://rspo.integrations.verl_reward",
        "reward.custom_reward_function.name=compute_score",
        "algorithm.rollout_correction.rollout_is=token",
        "algorithm.rollout_correction.rollout_is_threshold=2.0",
        "trainer.n_gpus_per_node=8",
        "trainer.nnodes=1",
        "trainer.total_epochs=1",
        *rspo_overrides("rspo"),
    ]
    return Command(argv)


def prepare(directory: str | Path, python: str = sys.executable, train_size: int = 64, limit: int = 8) -> Path:
    """``DIR/data``: Countdown's training stream and validation split as verl parquet (``rspo verl-data``:
    chat prompts, ``reward_model.ground_truth``, ``data_source`` rspo/countdown); ``DIR/model``: the shipped
    testbed model (Qwen3-MoE, 64 experts, top-8, 4 layers) with its tokenizer and a chat template."""
    directory = Path(directory)
    cmd = [python, "-m", "rspo.cli", "verl-data", "task.name=countdown", f"train_size={train_size}"]
    cmd += [f"limit={limit}", "splits=[validation]", f"out_dir={directory / 'data'}", "--overwrite"]
    subprocess.run(cmd, check=True)
    model = directory / "model"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(MODEL_ASSET, model)
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return directory


@dataclass
class Run:
    """One finished ``main_ppo``: exit code, log, the console logger's metrics per step, loss dumps."""

    returncode: int
    log: str
    metrics: dict[int, dict[str, float]]
    dumps: list[dict]
    seconds: float

    def tail(self, n: int = 4000) -> str:
        return self.log[-n:]


_STEP = re.compile(r"step:(\d+) - (.*)$")


def parse_metrics(log: str) -> dict[int, dict[str, float]]:
    """verl's console logger: ``step:N - key:value - key:value ...`` (a value may be negative: split on
    ' - ', then at the last ':')."""
    out: dict[int, dict[str, float]] = {}
    for line in log.splitlines():
        m = _STEP.search(line)
        if m:
            pairs = (item.rpartition(":") for item in m.group(2).split(" - "))
            out[int(m.group(1))] = {k.strip(): float(v) for k, _, v in pairs if k and _is_float(v)}
    return out


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def run(cmd: Command, workdir: Path, name: str, timeout: float = 900, dump: bool = False) -> Run:
    """Run ``cmd`` in ``workdir`` (``$PWD`` in it means the project root), log to ``workdir/name.log``;
    ``dump``: the plugin saves every loss call's inputs (``RSPO_VERL_DUMP_DIR``) to ``workdir/name-dump``."""
    import torch

    env = {**os.environ, **{k: v.replace("$PWD", str(ROOT)) for k, v in cmd.env.items()}}
    dump_dir = workdir / f"{name}-dump"
    if dump:
        shutil.rmtree(dump_dir, ignore_errors=True)
        env["RSPO_VERL_DUMP_DIR"] = str(dump_dir)
    argv = [a.replace("$PWD", str(ROOT)) for a in cmd.argv]
    log_path = workdir / f"{name}.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(argv, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            code = rc.returncode
        except subprocess.TimeoutExpired:
            code = -9
    seconds = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    files = sorted(dump_dir.glob("loss-r*.pt")) if dump else []
    dumps = [torch.load(f, weights_only=False) for f in files]
    return Run(code, text, parse_metrics(text), sorted(dumps, key=lambda d: (d["rank"], d["call"])), seconds)


SNIPPETS = {"verl-cpu.sh": lambda: cpu_command().shell(), "verl-paper.sh": lambda: paper_command().shell()}


def main(argv: list[str]) -> int:
    if argv[:1] == ["prepare"] and len(argv) == 2:
        print(prepare(argv[1]))
    elif argv == ["cpu"]:
        print(cpu_command().shell(), end="")
    elif argv == ["paper"]:
        print(paper_command().shell(), end="")
    elif argv == ["--write-docs"]:
        DOCS.mkdir(exist_ok=True)
        for name, render in SNIPPETS.items():
            (DOCS / name).write_text(render())
            print(DOCS / name)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
