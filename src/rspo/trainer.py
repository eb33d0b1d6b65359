"""The RL loop: GRPO-family training of a (MoE) policy on any task, readable top to bottom.

One step of ``train``:
  1. rollout    sample prompts from the task; G responses each with the sampler (KV cache)
  2. score      the task's verdicts, in scoring workers (errors and hangs are counted, the run goes on)
  3. advantage  group-relative (std-normalised, or Dr. GRPO's mean-only); zero-spread groups counted
  4. old pass   one no-grad forward: old log-probs and the old router trace together
  5. update     split the rollout batch into mini-batches, one optimizer step each, ppo_epochs
                times; mini-batches after the first are off-policy (the paper's regime). One forward
                gives log-probs, entropy and the current router log-probs at the old experts.
  6. log        metrics.jsonl (+ TensorBoard if installed), periodic validation, collapse
                detection, atomic checkpoints.

What passes between phases lives on the :class:`RolloutBatch`; the trainer holds only what lasts a run
(policy, optimizer, task, counters). Every tensor the loop makes lives on the policy's device.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rspo.config import load_config
from rspo.correction import mismatch_metrics
from rspo.errors import CheckpointError, ConfigError, NonFiniteError
from rspo.evaluate import evaluate
from rspo.logprobs import response_log_probs
from rspo.objectives import compute_policy_loss, masked_mean
from rspo.options import Options
from rspo.policy import load_policy, resolve_model_path
from rspo.routing import RouterTrace
from rspo.routing.step import OldTrace, RoutingStep, rollout_trace, routing_agreement
from rspo.rundir import RunDir, crash_point, load_tensors
from rspo.sampler import HFSampler
from rspo.scoring import REWARD_ERROR, REWARD_TIMEOUT, Scorer
from rspo.tasks import make_task
from rspo.train_config import TrainConfig

Tensor = torch.Tensor


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. repeated non-finite losses); the last good checkpoint is intact."""


# ----------------------------------------------------------------------------------------
# The rollout batch: everything one step's phases hand to each other
# ----------------------------------------------------------------------------------------
@dataclass
class RolloutBatch:
    """One rollout batch of B = prompts x G responses. Shapes in comments."""

    examples: list[Any]  # (B,) each prompt's example repeated G times
    sequences: Tensor  # (B, P + T) left-padded prompt, right-padded response
    attention_mask: Tensor  # (B, P + T)
    prompt_len: int  # P
    response_mask: Tensor  # (B, T) float, 1 on response tokens incl. the stop token
    texts: list[str]  # (B,)
    rewards: Tensor | None = None  # (B,) float64
    reasons: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    advantages: Tensor | None = None  # (B,)
    zero_spread: float = 0.0  # share of groups whose rewards are all equal
    worker_recycles: int = 0  # scoring workers replaced for their memory while scoring this batch
    loss_mask: Tensor | None = None  # (B, T) response mask without dropped groups
    order: Tensor | None = None  # (B,) row order of the first epoch's mini-batches (the old pass's)
    rollout_log_probs: Tensor | None = None  # (B, T) the sampler's, at the rollout temperature (if it reports them)
    old_log_probs: Tensor | None = None  # (B, T)
    rollout_weights: Tensor | None = None  # (B, T) or (B,) rollout correction (rollout_correction.level)
    rollout_stats: dict[str, float] = field(default_factory=dict)  # rollout/... mismatch metrics
    ref_log_probs: Tensor | None = None  # (B, T) under the initial policy (kl_coef > 0)
    old: OldTrace | None = None  # old router record (B, T, L, K); every position for replay
    routed_experts: Tensor | None = None  # (B, P + T - 1, L, k) the rollout's experts (rollout.record_routing)

    @property
    def resp(self) -> slice:
        """Sequence positions whose outputs score the response tokens (and whose routing is the token's)."""
        t = self.response_mask.shape[1]
        return slice(self.prompt_len - 1, self.prompt_len - 1 + t)

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]


def is_collapsed(accuracy: float, best: float, drop: float, min_best: float = 0.05) -> bool:
    """The collapse rule: accuracy below ``(1 - drop)`` x the running best, once the best is >= ``min_best``."""
    return best >= min_best and accuracy < (1 - drop) * best


def group_advantages(rewards: Tensor, group_size: int, mode: str) -> tuple[Tensor, Tensor]:
    """(advantages (B,), zero_spread (n_groups,) bool): r - mean, divided by the group std for 'grpo'."""
    r = rewards.view(-1, group_size)  # (n_groups, G)
    centered = r - r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True)  # unbiased, as GRPO / verl / TRL
    zero = (r.max(1).values - r.min(1).values) == 0
    adv = centered / (std + 1e-6) if mode == "grpo" else centered
    return adv.reshape(-1), zero


# ----------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------
@dataclass
class TrainerState:
    """What a run carries from step to step, saved whole in every checkpoint (``trainer_state.json``, with the
    Python RNG state) and loaded whole on resume."""

    step: int = 0
    data_pos: int = 0  # examples drawn from the task's training stream (the stream is replayed to here)
    opt_steps: int = 0
    best_val: float = -1.0
    last_val: float = math.nan
    collapse_step: int | None = None
    bad_steps: int = 0  # non-finite losses in a row

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerState:
        return cls(**{k: data[k] for k in cls.names()})


class Trainer:
    """The RL loop over a run directory.

    ``resume=False`` starts a new run in ``cfg.out_dir`` (created, or an empty directory, or with
    ``overwrite=True`` the same kind's earlier run; anything else is refused before anything is
    written). ``resume=True`` continues the run there from its newest complete checkpoint, or from
    step 0 if it was killed before its first one.
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> None:
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out_dir)
        torch.set_num_threads(cfg.threads)
        self.model_path = resolve_model_path(cfg.model)
        self.state = TrainerState()
        self._reward_messages: set[str] = set()
        self.hparams = cfg.objective_hparams()
        self.correction = cfg.rollout_correction.build()
        # a new run: everything that can be wrong with the input is found before the directory is touched
        self.run = RunDir.open_run(
            self.out, "train", resume=resume, overwrite=overwrite, before_create=lambda: self._setup(self.model_path)
        )
        try:
            if resume:
                ckpt = self.run.latest_checkpoint()  # recovers a kill during the checkpoint swap
                self._setup(str(ckpt) if ckpt else self.model_path)
                if ckpt is None:  # killed before its first checkpoint: start again from step 0
                    self.run.truncate_metrics(-1)
                else:
                    self._load_trainer_state(ckpt)
            else:
                self.run.write_config(cfg)
            self.tb = _tensorboard(self.run)
        except BaseException:
            self.run.close()
            raise
        self.stream = self.task.train_examples(seed=cfg.seed)
        for _ in range(self.state.data_pos):  # the data position survives restarts
            next(self.stream)

    def _setup(self, model_dir: str) -> None:
        """Task, policy (device, dtype), sampler, routing step and optimizer; the reference policy for KL."""
        cfg = self.cfg
        self.task = make_task(cfg.task.name, cfg.task.parsed)
        self.scorer = self._new_scorer()
        self.val_split = cfg.eval_split or (self.task.eval_splits() or [None])[0]
        if cfg.eval_every and self.val_split not in self.task.eval_splits():
            raise ConfigError(
                f"eval_split={self.val_split!r}: task {self.task.name!r} has splits {self.task.eval_splits()} "
                f"(set task.options.eval, eval_split, or eval_every=0)"
            )
        self.policy = load_policy(
            model_dir, device=cfg.device, dtype=cfg.dtype, gradient_checkpointing=cfg.gradient_checkpointing
        )
        self.device = self.policy.device
        self.model, self.tok = self.policy.model, self.policy.tokenizer
        self.model.train()
        self.sampler = HFSampler(self.policy)  # validation: the policy as it is trained
        self.rollout_policy = self.policy  # rollouts: the same model, or a copy in the rollout's own dtype
        if cfg.rollout.dtype is not None and cfg.rollout.dtype != cfg.dtype:
            copy = load_policy(model_dir, device=cfg.device, dtype=cfg.rollout.dtype)
            self.rollout_policy = copy  # its weights follow the policy's before every rollout
        self.rollout_sampler = HFSampler(self.rollout_policy)
        try:
            self.routing = RoutingStep(self.model, cfg.routing_options())
        except ValueError as e:
            if "top_k" not in str(e):
                raise
            raise ConfigError(f"router_shift.top_k={cfg.router_shift.top_k}: {e}") from None
        if cfg.rollout.record_routing and not self.routing.active:
            raise ConfigError(
                f"rollout.record_routing needs an MoE model with router capture ({type(self.model).__name__}"
                f" has none, or log_router=false)"
            )
        self.opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            betas=(0.9, 0.99),
        )
        self.ref_model = None
        if cfg.kl_coef > 0:
            self.ref_model = load_policy(self.model_path, device=cfg.device, dtype=cfg.dtype).model

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        try:
            return self._train()
        finally:
            self.scorer.close()
            self.run.close()

    def _train(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.state.step == 0 and cfg.eval_every:
            self._log({"step": 0, **self._validate()})
        bar = tqdm(
            range(self.state.step, cfg.steps),
            initial=self.state.step,
            total=cfg.steps,
            desc=f"train {cfg.objective.name}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for _ in bar:
            t0 = time.time()
            batch = self.rollout()  # 1
            t1 = time.time()
            self.score_and_advantages(batch)  # 2, 3
            t2 = time.time()
            self.old_pass(batch)  # 4
            t3 = time.time()
            stats = self.update(batch)  # 5
            t4 = time.time()
            self.state.step += 1
            n_tok = int(batch.response_mask.sum())
            rec = {
                "step": self.state.step,
                **self._rollout_metrics(batch),
                **stats,
                "time/generate": t1 - t0,
                "time/score": t2 - t1,
                "time/old_pass": t3 - t2,
                "time/update": t4 - t3,
                "perf/tokens_per_s": n_tok / (t4 - t0),
            }
            if cfg.eval_every and self.state.step % cfg.eval_every == 0:
                rec.update(self._validate())
            self._log(rec)  # 6
            crash_point("step_logged")
            post = {"reward": f"{rec['reward/mean']:.3f}", "val_acc": f"{self.state.last_val:.1%}"}
            gamma_off = offpolicy_key("router/gamma_mean")
            if gamma_off in rec:  # the drift RSPO sees (the first update's gamma is 1)
                post["gamma_off"] = f"{rec[gamma_off]:.4f}"
            bar.set_postfix(post)
            if self.state.step % cfg.checkpoint_every == 0 or self.state.step == cfg.steps:
                self.save_checkpoint()
        return self.summary()

    # ------------------------------------------------------------------ 1. rollout
    def rollout(self) -> RolloutBatch:
        r = self.cfg.rollout
        prompts = [next(self.stream) for _ in range(r.prompts_per_step)]
        self.state.data_pos += r.prompts_per_step
        examples = [p for p in prompts for _ in range(r.group_size)]
        if self.rollout_policy is not self.policy:  # the rollout's copy takes the policy's weights (cast)
            with torch.no_grad():
                self.rollout_policy.model.load_state_dict(self.model.state_dict())
        gen = self.rollout_sampler.sample(
            [self.task.prompt(x) for x in examples],
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            stop_strings=self.task.stop_strings,
            seed=_seed(self.cfg.seed, self.state.step, "sample"),
            record_routing=bool(r.record_routing),
        )
        return RolloutBatch(
            examples,
            gen.sequences,
            gen.attention_mask,
            gen.prompt_len,
            gen.response_mask.float(),
            gen.texts,
            rollout_log_probs=gen.logprobs,
            routed_experts=gen.routed_experts,
        )

    # ------------------------------------------------------------------ 2-3. rewards, advantages
    def _scorer(self) -> Scorer:
        """The scoring workers, for the current task (a task replaced on the trainer gets new workers)."""
        if self.scorer.reward_fn is not self.task:
            self.scorer.close()
            self.scorer = self._new_scorer()
        return self.scorer

    def _new_scorer(self) -> Scorer:
        return self.cfg.scoring.scorer(self.task)

    def score_and_advantages(self, b: RolloutBatch) -> None:
        scored = self._scorer().score(b.texts, b.examples)
        for why, msg in scored.messages.items():
            if why not in self._reward_messages:  # the first error of each kind, once per run
                self._reward_messages.add(why)
                tqdm.write(f"step {self.state.step + 1}: {why} (first of this run; reward 0, counted): {msg}")
        # float64: a group's spread of rewards near float32's limit (the scorer's bound) must not overflow
        b.rewards = torch.tensor(scored.rewards, dtype=torch.float64, device=self.device)
        b.reasons, b.correct, b.worker_recycles = scored.reasons, scored.correct, scored.recycled
        adv, zero = group_advantages(b.rewards, self.cfg.rollout.group_size, self.cfg.advantage)
        b.advantages = adv.float()  # (B,) the loss's dtype
        b.zero_spread = float(zero.float().mean())
        keep = torch.ones_like(b.advantages)
        if self.cfg.drop_zero_spread:
            keep = (~zero).float().repeat_interleave(self.cfg.rollout.group_size)
        b.loss_mask = b.response_mask * keep[:, None]

    # ------------------------------------------------------------------ 4. old pass
    @torch.no_grad()
    def old_pass(self, b: RolloutBatch) -> None:
        """Old log-probs and router trace, in the mini-batch grouping of the first update epoch; then the
        rollout mismatch (sampler vs old pass) and, with rollout_correction, its weights.

        Same rows, same order, same model: the first mini-batch's ratios and gamma are exactly 1.
        """
        b.order = _permutation(len(b.texts), _seed(self.cfg.seed, self.state.step, "order"), self.device)
        logps, traces = [], []
        r3 = self.routing.replays_rollout
        for mb in b.order.split(self.cfg.mini_batch_size):
            rollout = b.routed_experts[mb] if r3 else None
            with self.routing.capture(b.resp, chunks="sequence", rollout=rollout) as rec:
                logp, _, _ = response_log_probs(
                    self.model,
                    b.sequences[mb],
                    b.attention_mask[mb],
                    b.response_len,
                    entropy=False,
                    temperature=self.cfg.rollout.temperature,
                )
            logps.append(logp)
            if rec is not None:
                traces.append(rec.trace)
        inv = torch.argsort(b.order)  # back to rollout order
        b.old_log_probs = torch.cat(logps)[inv]
        if traces:
            weights = None if traces[0].weights is None else torch.cat([t.weights for t in traces])[inv]
            full = RouterTrace(
                torch.cat([t.topk_idx for t in traces])[inv], torch.cat([t.logp for t in traces])[inv], weights
            )
            b.old = self.routing.old_trace(full, b.resp, rollout=b.routed_experts)
        if b.rollout_log_probs is not None:  # the same model here: ratios 1 up to numerics (a separate engine: not)
            if self.correction is None:  # diagnostics only
                b.rollout_stats = mismatch_metrics(b.old_log_probs, b.rollout_log_probs, b.loss_mask)
            else:
                b.rollout_weights, b.rollout_stats = self.correction.weights(
                    b.old_log_probs, b.rollout_log_probs, b.loss_mask
                )
        if b.routed_experts is not None and self.cfg.rollout.routing_diagnostics and b.old is not None:
            b.rollout_stats.update(self._routing_diagnostics(b))
        if self.ref_model is not None:
            ref = response_log_probs(
                self.ref_model,
                b.sequences,
                b.attention_mask,
                b.response_len,
                entropy=False,
                temperature=self.cfg.rollout.temperature,
            )
            b.ref_log_probs = ref[0]

    @torch.no_grad()
    def _routing_diagnostics(self, b: RolloutBatch) -> dict[str, float]:
        """The rollout's routing against the trainer's: the trainer's own top-K against the rollout's experts
        (``rollout/routing_*``), and the log-prob mismatch to the sampler with the trainer's own routing
        (``rollout/own/*``) and with the rollout's experts replayed (``rollout/replayed/*``). The old pass gives
        one of the two; a second no-grad forward gives the other."""
        rollout_resp = b.routed_experts[:, b.resp]  # (B, T, L, k)
        own = b.old.own if b.old.own is not None else b.old.trace.topk_idx
        out = {}
        if own.shape == rollout_resp.shape:  # a stored top-K other than the model's: no comparison
            out |= routing_agreement(rollout_resp, own, b.response_mask, "rollout/routing_")
        replayed = self.routing.replays_rollout
        other = []
        for mb in b.order.split(self.cfg.mini_batch_size):
            ctx = (
                contextlib.nullcontext()
                if replayed  # the run replays: the other is the trainer's own
                else self.routing.routers.replay(rollout_trace(b.routed_experts[mb]), mode="indices")
            )
            with ctx:
                logp, _, _ = response_log_probs(
                    self.model,
                    b.sequences[mb],
                    b.attention_mask[mb],
                    b.response_len,
                    entropy=False,
                    temperature=self.cfg.rollout.temperature,
                )
            other.append(logp)
        other_logp = torch.cat(other)[torch.argsort(b.order)]
        own_logp, replayed_logp = (other_logp, b.old_log_probs) if replayed else (b.old_log_probs, other_logp)
        for name, logp in (("own", own_logp), ("replayed", replayed_logp)):
            m = mismatch_metrics(logp, b.rollout_log_probs, b.loss_mask)
            out |= {k.replace("rollout/", f"rollout/{name}/", 1): v for k, v in m.items()}
        return out

    # ------------------------------------------------------------------ 5. update
    def update(self, b: RolloutBatch) -> dict[str, float]:
        cfg = self.cfg
        per_update: list[dict[str, float]] = []
        grads: list[Tensor] = []  # flattened gradients of this step's updates (log_grad_variance)
        for epoch in range(cfg.ppo_epochs):
            order = (
                b.order
                if epoch == 0
                else _permutation(len(b.texts), _seed(cfg.seed, self.state.step, f"order{epoch}"), self.device)
            )
            for mb in order.split(cfg.mini_batch_size):
                try:
                    loss, m = self.policy_loss(b, mb)
                except NonFiniteError as e:  # e.g. NaN router log-probs of a diverged model
                    loss, m = torch.tensor(float("nan")), {"train/nonfinite_router": 1.0}
                    tqdm.write(f"step {self.state.step + 1}: {e}")
                m["train/nonfinite_loss"] = 0.0
                if not torch.isfinite(loss):
                    self.routing.end()
                    self.state.bad_steps += 1
                    m["train/nonfinite_loss"] = 1.0
                    tqdm.write(
                        f"step {self.state.step + 1}: non-finite loss ({loss.item()}), optimizer step skipped "
                        f"({self.state.bad_steps}/{cfg.max_bad_steps} in a row)"
                    )
                    if self.state.bad_steps >= cfg.max_bad_steps:
                        raise TrainingError(
                            f"{self.state.bad_steps} non-finite losses in a row at step {self.state.step + 1}; "
                            f"stopping. The last good checkpoint is {self.out / 'checkpoint'} "
                            f"(step {self._ckpt_step()})"
                        )
                    self.opt.zero_grad(set_to_none=True)
                    per_update.append(m)
                    continue
                self.state.bad_steps = 0
                self.backward(loss)
                if cfg.log_grad_variance:
                    grads.append(self.flat_grad().clone())
                m["grad/norm"] = self.optimizer_step()
                per_update.append(m)
        out = _mean_metrics(per_update)
        if len(grads) > 1:
            g = torch.stack(grads)  # (updates, n_params)
            out["grad/minibatch_var"] = float(g.var(0, correction=1).sum())
            cos = [float(torch.nn.functional.cosine_similarity(x, y, dim=0)) for x, y in itertools.pairwise(grads)]
            out["grad/minibatch_cos"] = sum(cos) / len(cos)
        return out

    def backward(self, loss: Tensor) -> None:
        """Gradients of ``loss`` (replay stays on through the backward: checkpointed layers recompute with it)."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.routing.end()

    def flat_grad(self) -> Tensor:
        """The current gradient of every trainable parameter, flattened ``(n_params,)`` (zeros where none)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])

    def optimizer_step(self) -> float:
        """Clip the gradient norm, set the (warmup) learning rate and step; returns the norm before clipping."""
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        for g in self.opt.param_groups:
            g["lr"] = cfg.optim.lr * min(1.0, (self.state.opt_steps + 1) / max(1, cfg.optim.warmup_steps))
        self.opt.step()
        self.state.opt_steps += 1
        return float(gn)

    def policy_loss(self, b: RolloutBatch, mb: Tensor, options: Options | None = None) -> tuple[Tensor, dict]:
        """Loss and metrics of mini-batch ``mb`` (row indices): one forward gives log-probs, entropy and
        the current router at the old experts; gamma; the objective; optional KL and router aux loss.
        ``options``: another objective and router shift than the run's (``rspo gradvar`` compares them)."""
        cfg = self.cfg
        opts = cfg.options if options is None else options
        hparams = self.hparams if options is None else opts.objective_hparams(norm_length=cfg.max_new_tokens)
        old = b.old[mb] if b.old is not None else None
        with self.routing.forward(old, b.resp) as cur:
            logp, entropy, aux = response_log_probs(
                self.model,
                b.sequences[mb],
                b.attention_mask[mb],
                b.response_len,
                temperature=cfg.rollout.temperature,
                output_router_logits=cfg.routing.aux_loss_coef > 0,
            )
        gamma = self.routing.gamma(old, cur.trace) if cur is not None else None  # (m, T)
        mask = b.loss_mask[mb]
        loss, m = compute_policy_loss(
            opts.objective.name,
            logp,
            b.old_log_probs[mb],
            b.advantages[mb],
            mask,
            router_shift=gamma if opts.shift else None,
            rollout_weights=None if b.rollout_weights is None else b.rollout_weights[mb],
            rollout_weights_reduce=cfg.rollout_correction.reduce,
            **hparams,
        )
        if b.ref_log_probs is not None:
            d = b.ref_log_probs[mb] - logp
            kl = masked_mean(torch.exp(d) - d - 1, mask)
            loss = loss + cfg.kl_coef * kl
            m["kl/ref"] = float(kl.detach())
        if cfg.routing.aux_loss_coef > 0:
            loss = loss + cfg.routing.aux_loss_coef * aux
            m["router/aux_loss"] = float(aux.detach())
        if cur is not None:
            m.update(self.routing.metrics(old, cur.trace, gamma, b.response_mask[mb]))
        m["entropy/mean"] = float(masked_mean(entropy, b.response_mask[mb]))
        return loss, m

    # ------------------------------------------------------------------ 6. metrics, validation, checkpoints
    def _rollout_metrics(self, b: RolloutBatch) -> dict[str, float]:
        lengths = b.response_mask.sum(1)
        return {
            "reward/mean": float(b.rewards.mean()),
            "reward/std": float(b.rewards.std()),
            "reward/accuracy": sum(b.correct) / len(b.correct),
            "reward/errors": float(sum(r in (REWARD_ERROR, REWARD_TIMEOUT) for r in b.reasons)),
            "reward/timeouts": float(sum(r == REWARD_TIMEOUT for r in b.reasons)),
            "reward/worker_recycles": float(b.worker_recycles),
            "reward/zero_spread_groups": b.zero_spread,
            "response/length_mean": float(lengths.mean()),
            "response/length_max": float(lengths.max()),
            **b.rollout_stats,
        }

    def _validate(self) -> dict[str, float]:
        cfg = self.cfg
        val = self.task.eval_examples(self.val_split)[: cfg.eval_problems]
        common = {"max_new_tokens": cfg.max_new_tokens, "scorer": self._scorer(), "sampler": self.sampler}
        acc = evaluate(self.policy, self.task, val, greedy=True, **common).accuracy
        rec = {"val/accuracy": acc}
        if cfg.eval_samples:
            rec["val/accuracy_sampled"] = evaluate(
                self.policy,
                self.task,
                val,
                greedy=False,
                n=cfg.eval_samples,
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                seed=cfg.seed,
                **common,
            ).accuracy
        self.model.train()
        self.state.last_val = acc
        self.state.best_val = max(self.state.best_val, acc)
        rec |= {"val/best": self.state.best_val, "val/collapsed": 0.0}
        if is_collapsed(acc, self.state.best_val, cfg.collapse_drop):
            rec["val/collapsed"] = 1.0
            if self.state.collapse_step is None:
                self.state.collapse_step = self.state.step
                tqdm.write(
                    f"COLLAPSE at step {self.state.step}: validation accuracy {acc:.1%} is below "
                    f"{1 - cfg.collapse_drop:.0%} of its best {self.state.best_val:.1%}"
                )
        return rec

    def _log(self, rec: dict[str, Any]) -> None:
        self.run.append_metrics(rec)
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.state.step,
            "best_val": self.state.best_val,
            "last_val": self.state.last_val,
            "collapse_step": self.state.collapse_step,
            "out_dir": str(self.out),
        }

    def _ckpt_step(self) -> int | None:
        f = self.out / "checkpoint"
        return RunDir.read_state(f)["step"] if (f / "trainer_state.json").is_file() else None

    def save_checkpoint(self) -> None:
        """Model, tokenizer, optimizer, RNG states, step and data position, swapped in atomically.

        ``trainer.pt`` holds only tensors and plain containers (loaded with ``weights_only=True``);
        counters and the Python RNG state are JSON in ``trainer_state.json``.
        """

        def payload(d: Path) -> None:
            self.model.save_pretrained(d)
            self.tok.save_pretrained(d)
            rng = {"torch_rng": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda_rng"] = torch.cuda.get_rng_state_all()
            torch.save({"optimizer": self.opt.state_dict(), **rng}, d / "trainer.pt")

        version, internal, gauss = random.getstate()
        self.run.write_checkpoint(payload, {**self.state.to_json(), "python_rng": [version, list(internal), gauss]})

    def _load_trainer_state(self, ckpt: Path) -> None:
        """Optimizer, RNG states and counters of checkpoint ``ckpt`` (the policy is already loaded from it);
        metrics logged after it (the lost steps, a torn last line) are dropped."""
        state = RunDir.read_state(ckpt, (*TrainerState.names(), "python_rng"))
        extra = load_tensors(ckpt / "trainer.pt")
        try:
            self.opt.load_state_dict(extra["optimizer"])
            torch.set_rng_state(extra["torch_rng"])
            if "cuda_rng" in extra and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(extra["cuda_rng"])
            version, internal, gauss = state["python_rng"]
            random.setstate((version, tuple(internal), gauss))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt or incomplete: {type(e).__name__}: {e}") from None
        self.state = TrainerState.from_json(state)
        self.run.truncate_metrics(self.state.step)


OFFPOLICY = (
    "ratio/std",
    "ratio/max",
    "clip_ratio/region_mean",
    "router/gamma_mean",
    "router/gamma_p10",
    "router/gamma_p1",
    "router/gamma_p50",
    "router/gamma_below_0.99",
    "router/gamma_below_0.95",
    "router/gamma_below_0.9",
    "router/non_shifted_ratio",
    "kl/approx",
)
"""Metrics also averaged over the off-policy updates alone (:func:`offpolicy_key`): the drift RSPO acts on."""
OFFPOLICY_HIST = "offpolicy/gamma_hist"
"""The per-token gamma histogram summed over a step's off-policy updates (bins: ``rspo.routing.GAMMA_EDGES``)."""


def offpolicy_key(key: str) -> str:
    """The name under which metric ``key`` averaged over a step's off-policy updates is logged
    (``router/gamma_mean`` -> ``offpolicy/router_gamma_mean``)."""
    return "offpolicy/" + key.replace("/", "_")


def _mean_metrics(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over the step's updates, plus the off-policy updates' (all but the first) drift signals: the
    OFFPOLICY keys and the per-layer ones averaged, the gamma histograms summed (:data:`OFFPOLICY_HIST`)."""
    keys = {k for m in items for k, v in m.items() if isinstance(v, (int, float))}
    out: dict[str, Any] = {k: sum(m[k] for m in items if k in m) / sum(k in m for m in items) for k in keys}
    out["train/nonfinite_loss"] = sum(m.get("train/nonfinite_loss", 0.0) for m in items)
    if len(items) > 1:
        off = items[1:]
        for k in sorted({*OFFPOLICY, *(k for k in keys if k.startswith(("router/keep_layer", "router/shift_layer")))}):
            vals = [m[k] for m in off if k in m]
            if vals:
                out[offpolicy_key(k)] = sum(vals) / len(vals)
        hists = [m["router/gamma_hist"] for m in off if "router/gamma_hist" in m]
        if hists:
            out[OFFPOLICY_HIST] = [sum(c) for c in zip(*hists, strict=True)]
    return out


def _seed(seed: int, step: int, what: str) -> int:
    return random.Random(f"{seed}/{step}/{what}").randrange(2**31)


def _permutation(n: int, seed: int, device: torch.device) -> Tensor:
    """A seeded permutation (drawn on the CPU, so it is the same on every device), placed on ``device``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)


def _tensorboard(run: RunDir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter(str(run.claim("tb")))


def train(cfg: TrainConfig, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    return Trainer(cfg, progress=progress, overwrite=overwrite).train()


def resume(run_dir: str | Path, progress: bool = True, overrides: list[str] | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last checkpoint (its saved config, optionally with overrides,
    which are then saved as its config)."""
    run_dir = Path(run_dir)
    RunDir.existing(run_dir, "train")  # a clear error before reading anything else
    cfg = load_config(TrainConfig, run_dir / "config.yaml", overrides or [])
    cfg.out_dir = str(run_dir)  # the directory may have been moved
    trainer = Trainer(cfg, resume=True, progress=progress)
    if overrides:
        trainer.run.write_config(cfg)
    return trainer.train()


__all__ = [
    "RolloutBatch",
    "Trainer",
    "TrainerState",
    "TrainingError",
    "group_advantages",
    "is_collapsed",
    "offpolicy_key",
    "resume",
    "train",
]
