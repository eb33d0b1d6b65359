"""Pretrain a tiny MoE base policy from scratch, supervised on a task's reference responses.

    rspo pretrain out_dir=runs/countdown-base steps=3000 [--overwrite]            # Countdown, char tokenizer
    rspo pretrain task.name=arithmetic tokenizer=bpe out_dir=runs/math-tiny-base  # boxed arithmetic, BPE + chat

Each example is ``prompt + reference + eos`` (chat prompts rendered with the tokenizer's template); the
loss covers the response and eos only. Examples stream from the task's training stream (disjoint
from its evaluation splits); for Countdown the exact solver solves them in a background thread.
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from tqdm.auto import tqdm

from rspo.config import to_dict
from rspo.errors import ConfigError
from rspo.evaluate import evaluate
from rspo.lab.presets import PRESETS, build_model, count_parameters
from rspo.lab.tokenizer import build_bpe_tokenizer, build_char_tokenizer
from rspo.policy import policy_of
from rspo.prompts import render_prompt
from rspo.rundir import RunDir, crash_point
from rspo.scoring import Scorer
from rspo.tasks import Prompt, Task, TaskConfig, make_task


@dataclass
class PretrainConfig:
    preset: str = "qwen3-moe-countdown"
    """Model preset from ``rspo models``."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Task whose reference responses are the training data (countdown: solver solutions; arithmetic and
    math: worked solutions); validation on its first evaluation split, the final test on its last."""
    tokenizer: Literal["char", "bpe"] = "char"
    """char: the Countdown character tokenizer; bpe: byte-level BPE trained here on shipped text, with a
    ChatML chat template."""
    bpe_vocab_size: int = 512
    """Vocabulary size of the BPE tokenizer (>= 300)."""
    out_dir: str = "runs/countdown-base"
    """Directory the final checkpoint (model, tokenizer, pretrain.json) is written to."""
    seed: int = 0
    """Seed of the model init, the data stream and sampling."""
    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW), after linear warmup, cosine-decayed to 10% at the end."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eval_every: int = 500
    """Steps between greedy validation-accuracy checks (0: only at the end)."""
    eval_problems: int = 200
    """Validation problems per periodic check."""
    final_eval: bool = True
    """Evaluate greedy and sampled (T=1) accuracy on the task's last evaluation split at the end."""
    threads: int = 2
    """torch CPU threads."""
    shuffle_buffer: int = 4096
    """Examples held in the shuffle buffer of the training stream (1 .. 1,000,000)."""
    router_aux_loss_coef: float = 0.0
    """Router load-balancing loss (transformers' aux_loss) added with this coefficient; 0 = off. Raises the
    router's entropy (the drift atlas varies it)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not a model preset; valid: {', '.join(PRESETS)}")
        if not 1 <= self.shuffle_buffer <= 1_000_000:
            raise ValueError(f"shuffle_buffer must be in [1, 1000000], got {self.shuffle_buffer}")
        for name in ("steps", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.eval_problems < 1:
            raise ValueError("warmup_steps and eval_every must be >= 0, eval_problems >= 1")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if self.bpe_vocab_size < 300:
            raise ValueError(f"bpe_vocab_size must be >= 300, got {self.bpe_vocab_size}")


class ReferenceStream:
    """(prompt, reference) pairs of a task's training stream, made in a background thread (the Countdown
    solver is the slow part) and shuffled in a buffer.

    The producer is a single thread writing in stream order and the shuffle uses its own seeded RNG, so
    the sequence of examples is deterministic for a seed.
    """

    def __init__(self, task: Task, seed: int, buffer: int = 4096) -> None:
        self._q: queue.Queue[tuple[Prompt, str]] = queue.Queue(maxsize=8192)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._rng = random.Random(seed)
        self._buffer: list[tuple[Prompt, str]] = []
        self._size = buffer
        self._thread = threading.Thread(target=self._produce, args=(task.references(seed),), daemon=True)
        self._thread.start()

    def _produce(self, stream) -> None:
        try:
            for item in stream:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._error = e

    def take(self, n: int) -> list[tuple[Prompt, str]]:
        out = []
        while len(out) < n:
            while len(self._buffer) < self._size:
                try:
                    self._buffer.append(self._q.get(timeout=0.5))
                except queue.Empty:
                    if self._error is not None:
                        raise self._error from None
            j = self._rng.randrange(len(self._buffer))
            self._buffer[j], self._buffer[-1] = self._buffer[-1], self._buffer[j]
            out.append(self._buffer.pop())
        return out

    def close(self) -> None:
        self._stop.set()


def collate(tokenizer, pairs: list[tuple[Prompt, str]]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask and labels (-100 outside response + eos). Prompts are rendered
    and tokenized exactly as the policy does for RL (:func:`rspo.prompts.render_prompt`)."""
    seqs, labels = [], []
    for prompt, response in pairs:
        p = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=isinstance(prompt, str))["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    n = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    am = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    lab = torch.tensor([x + [-100] * (n - len(x)) for x in labels])
    return {"input_ids": ids, "attention_mask": am, "labels": lab}


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def pretrain(cfg: PretrainConfig, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run pretraining; returns the metrics written to ``out_dir/pretrain.json``.

    ``out_dir`` is claimed before training starts: it must be new, empty, or (``overwrite``) an earlier
    pretraining output, whose files are then replaced; anything else is refused untouched.
    """
    task = make_task(cfg.task.name, cfg.task.parsed)
    splits = task.eval_splits()
    if (cfg.eval_every or cfg.final_eval) and not splits:
        raise ConfigError(f"task {task.name!r} has no evaluation split: set eval_every=0 and final_eval=false")
    run = RunDir.create(cfg.out_dir, "pretrain", overwrite=overwrite)
    torch.set_num_threads(cfg.threads)
    tok = build_char_tokenizer() if cfg.tokenizer == "char" else build_bpe_tokenizer(vocab_size=cfg.bpe_vocab_size)
    model = build_model(
        cfg.preset, len(tok), seed=cfg.seed, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    total, active = count_parameters(model)
    aux = cfg.router_aux_loss_coef > 0
    if aux:
        model.config.router_aux_loss_coef = cfg.router_aux_loss_coef  # transformers adds coef x aux_loss to .loss
    policy = policy_of(model, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    stream = ReferenceStream(task, cfg.seed, buffer=cfg.shuffle_buffer)
    scorer = Scorer(task)
    val = task.eval_examples(splits[0])[: cfg.eval_problems] if cfg.eval_every else []
    history: list[dict[str, float]] = []
    t0, tokens = time.time(), 0
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress, dynamic_ncols=True)
    last_acc = float("nan")
    try:
        for step in bar:
            batch = collate(tok, stream.take(cfg.batch_size))
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            model.train()
            loss = model(**batch, output_router_logits=True).loss if aux else model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tokens += int(batch["attention_mask"].sum())
            rec = {
                "step": step + 1,
                "loss": loss.item(),
                "lr": lr_at(step, cfg),
                "tokens_per_s": tokens / (time.time() - t0),
            }
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                last_acc = evaluate(policy, task, val, greedy=True, scorer=scorer).accuracy
                rec["val_greedy_acc"] = last_acc
            history.append(rec)
            if (step + 1) % 25 == 0:  # for grids of pretraining runs (rspo drift): the step reached so far
                run.write_json("progress.json", {"step": step + 1, "steps": cfg.steps})
            bar.set_postfix(loss=f"{rec['loss']:.3f}", val_acc=f"{last_acc:.1%}", tok_s=f"{rec['tokens_per_s']:.0f}")
    finally:
        stream.close()
    train_s = time.time() - t0
    result: dict[str, Any] = {
        "config": to_dict(cfg),
        "command": " ".join(sys.argv),
        "params_total": total,
        "params_active": active,
        "train_seconds": round(train_s, 1),
        "tokens": tokens,
        "final_loss": history[-1]["loss"],
    }
    if cfg.final_eval:
        test = task.eval_examples(splits[-1])
        greedy = evaluate(policy, task, test, greedy=True, progress=progress, scorer=scorer)
        sampled = evaluate(
            policy, task, test, greedy=False, temperature=1.0, seed=cfg.seed, progress=progress, scorer=scorer
        )
        result.update(test_split=splits[-1], test_greedy_acc=greedy.accuracy, test_sampled_acc=sampled.accuracy)
        if any("group" in r for r in greedy.records):  # the task's own split (Countdown: by number count)
            result["test_greedy_by_group"] = by_group(greedy.records)
            result["test_sampled_by_group"] = by_group(sampled.records)
    scorer.close()
    save_policy(run, model, tok, {**result, "history": history}, cfg)
    return result


def by_group(records: list[dict]) -> dict[str, float]:
    """Accuracy per the task's group label (:meth:`rspo.tasks.Task.group`) of evaluation records."""
    groups: dict[str, list[bool]] = {}
    for r in records:
        groups.setdefault(str(r.get("group")), []).append(r["correct"])
    return {g: sum(v) / len(v) for g, v in sorted(groups.items())}


def save_policy(run: RunDir, model, tokenizer, info: dict[str, Any], cfg: PretrainConfig) -> Path:
    """Model (safetensors), tokenizer, pretrain_config.yaml and pretrain.json into the run directory.

    Written into a staging directory inside it, then moved up file by file (pretrain.json last, so a
    directory with pretrain.json holds a complete policy); every file is recorded in the marker.
    """
    staging = run.claim(".staging")
    if staging.exists():
        shutil.rmtree(staging)  # ours: a torn earlier save
    staging.mkdir()
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "pretrain_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (staging / "pretrain.json").write_text(json.dumps(info, indent=1))
    crash_point("pretrain_saving")
    for f in sorted(staging.iterdir(), key=lambda f: f.name == "pretrain.json"):
        os.replace(f, run.claim(f.name))
    staging.rmdir()
    return run.path


def ship(run_dir: str | Path, name: str, progress: bool = True) -> Path:
    """Copy a pretrained policy into the package (``src/rspo/assets/NAME``, loaded as ``model: builtin:NAME``)
    with float16 weights (half the size; loaded as float32), and record the copy's own test accuracy
    (``pretrain.json`` key ``shipped``), so the shipped numbers are measured, not assumed.

        python -c "from rspo.lab.pretrain import ship; ship('runs/math-tiny-base', 'math-tiny-base')"
    """
    from rspo.assets import DIR
    from rspo.policy import load_policy

    src = Path(run_dir)
    info = json.loads((src / "pretrain.json").read_text())
    cfg = info["config"]
    pol = load_policy(src)
    dest = DIR / name  # then name it in rspo.assets.POLICIES, which builtin:NAME resolves through
    dest.mkdir(parents=True, exist_ok=True)
    pol.model.half().save_pretrained(dest)
    pol.tokenizer.save_pretrained(dest)
    for f in ("pretrain_config.yaml",):
        (dest / f).write_text((src / f).read_text())
    shipped = load_policy(dest)  # float32 again, as users get it
    task = make_task(cfg["task"]["name"], cfg["task"]["options"])
    test = task.eval_examples(task.eval_splits()[-1])
    greedy = evaluate(shipped, task, test, greedy=True, progress=progress).accuracy
    sampled = evaluate(shipped, task, test, greedy=False, temperature=1.0, seed=cfg["seed"], progress=progress).accuracy
    info["shipped"] = {
        "weights": "float16 safetensors (loaded as float32)",
        "test_greedy_acc": greedy,
        "test_sampled_acc": sampled,
    }
    (dest / "pretrain.json").write_text(json.dumps(info, indent=1))
    return dest
