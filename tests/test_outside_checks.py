"""Outside checks: our grpo / gspo / gspo_token / gmpo against verl's and TRL's own loss code.

verl 0.9.1 (`verl.trainer.ppo.core_algos`, installed with --no-deps by `make test`) exposes its
losses as pure functions. TRL 1.16 computes its loss inside `GRPOTrainer._compute_loss`; we build
a real trainer on a tiny MoE model and replace only the model forward
(`_get_per_token_logps_and_entropies`) with our random log-probs, so TRL's own loss code runs.
Same hyperparameters on both sides; where the papers agree the values must match to 1e-10.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rspo.objectives import compute_policy_loss

F64 = torch.float64


def random_inputs(seed: int, b: int = 8, t: int = 12, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=F64) * 3
    lp = old + spread * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    adv[0] = 0.0
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[1] = t
    mask = (torch.arange(t)[None] < lengths[:, None]).to(F64)
    return lp, old, adv, mask


SEEDS = [0, 1, 2, 3]
# verl divides by (len + 1e-8) where we divide by len; with O(1) per-sequence terms the
# difference is below 1e-8. Everything else must agree to 1e-10.
VERL_EPS_TOL = 1e-8


# ---------------------------------------------------------------------------------------- verl
@pytest.fixture(scope="module")
def verl():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="install requirements-outside.txt")
    from verl.workers.config import ActorConfig

    def cfg(clip_low, clip_high, **kw):
        # clip_ratio_c huge: verl's dual clip never binds (GRPO has none).
        return ActorConfig(
            strategy="fsdp",
            rollout_n=1,
            clip_ratio=clip_low,
            clip_ratio_low=clip_low,
            clip_ratio_high=clip_high,
            clip_ratio_c=1e12,
            ppo_micro_batch_size_per_gpu=1,
            **kw,
        )

    return core_algos, cfg


def _verl_loss(verl, name, lp, old, adv, mask, agg, clip_low, clip_high):
    core_algos, cfg = verl
    fn = core_algos.get_policy_loss_fn(name)
    lp = lp.clone().requires_grad_(True)
    loss, _ = fn(old, lp, adv[:, None].expand_as(lp), mask, agg, cfg(clip_low, clip_high))
    loss.backward()
    return loss.detach(), lp.grad


def _ours(name, lp, old, adv, mask, **hp):
    lp = lp.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss(name, lp, old, adv, mask, **hp)
    loss.backward()
    return loss.detach(), lp.grad, metrics


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_grpo_vs_verl_vanilla(verl, seed, agg):
    lp, old, adv, mask = random_inputs(seed)
    ref_loss, ref_grad = _verl_loss(verl, "vanilla", lp, old, adv, mask, agg, 0.2, 0.28)
    loss, grad, _ = _ours("grpo", lp, old, adv, mask, clip_low=0.2, clip_high=0.28, loss_agg=agg)
    # verl's seq-mean-token-mean divides by (len + 1e-8): each O(1) sequence term is off by a
    # factor len / (len + 1e-8), so the difference is bounded by 1e-8 (exact for token-mean).
    tol = 1e-10 if agg == "token-mean" else VERL_EPS_TOL
    torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=tol, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_vs_verl(verl, seed):
    # verl's "gspo" is the GSPO-token form aggregated seq-mean-token-mean: equal to our gspo
    # (sequence form) and gspo_token in value and gradient, for per-sequence advantages.
    lp, old, adv, mask = random_inputs(seed, spread=0.02)
    ref_loss, ref_grad = _verl_loss(verl, "gspo", lp, old, adv, mask, "seq-mean-token-mean", 3e-4, 4e-4)
    for name in ("gspo", "gspo_token"):
        loss, grad, _ = _ours(name, lp, old, adv, mask)  # defaults 3e-4 / 4e-4
        torch.testing.assert_close(loss, ref_loss, atol=VERL_EPS_TOL, rtol=0)
        torch.testing.assert_close(grad, ref_grad, atol=VERL_EPS_TOL, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_gmpo_vs_verl_geo_mean(verl, seed):
    lp, old, adv, mask = random_inputs(seed, spread=0.5)
    ref_loss, ref_grad = _verl_loss(verl, "geo_mean", lp, old, adv, mask, "token-mean", 0.4, 0.4)
    loss, grad, _ = _ours("gmpo", lp, old, adv, mask)
    torch.testing.assert_close(loss, ref_loss, atol=VERL_EPS_TOL, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=VERL_EPS_TOL, rtol=0)


# ---------------------------------------------------------------------------------------- TRL
@pytest.fixture(scope="module")
def trl_trainers(tmp_path_factory, tiny_moe_and_tokenizer):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

    model, tok = tiny_moe_and_tokenizer
    data = Dataset.from_dict({"prompt": ["1 2 3", "4 5 6"]})

    def reward(completions, **kw):
        return [0.0] * len(completions)

    def make(cls, cfg_cls, **kw):
        out = tmp_path_factory.mktemp(cls.__name__)
        args = cfg_cls(
            output_dir=str(out),
            use_cpu=True,
            bf16=False,
            report_to=[],
            num_generations=2,
            per_device_train_batch_size=2,
            max_completion_length=4,
            logging_steps=1,
            **kw,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = cls(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1
        return tr

    return {
        "grpo": make(GRPOTrainer, GRPOConfig, loss_type="grpo", epsilon=0.2, epsilon_high=0.28),
        "gspo": make(
            GRPOTrainer,
            GRPOConfig,
            loss_type="grpo",
            importance_sampling_level="sequence",
            epsilon=3e-4,
            epsilon_high=4e-4,
        ),
        "dr_grpo": make(GRPOTrainer, GRPOConfig, loss_type="dr_grpo", epsilon=0.2, epsilon_high=0.2),
        "gmpo": make(GMPOTrainer, GMPOConfig, epsilon=0.4, epsilon_high=0.4),
    }


def _trl_loss(trainer, lp, old, adv, mask):
    lp = lp.clone().requires_grad_(True)
    b, t = lp.shape

    def fake_forward(*args, **kwargs):  # replaces only the model forward
        return lp, torch.zeros_like(lp), torch.zeros((), dtype=lp.dtype)  # aux loss 0

    trainer._get_per_token_logps_and_entropies = fake_forward
    inputs = {
        "prompt_ids": torch.ones(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.ones(b, t, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
    }
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), lp.grad, trainer._metrics["train"]


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_vs_trl(trl_trainers, seed):
    lp, old, adv, mask = random_inputs(seed)
    ref_loss, ref_grad, trl_metrics = _trl_loss(trl_trainers["grpo"], lp, old, adv, mask)
    loss, grad, m = _ours("grpo", lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0)
    # Same clip-fraction definitions (active clip), same metric names. TRL reduces the token
    # counts in float32, hence float32 precision for these shares of counts.
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert m[key] == pytest.approx(trl_metrics[key][-1], abs=1e-7)
    assert any(trl_metrics[k][-1] > 0 for k in ("clip_ratio/low_mean", "clip_ratio/high_mean"))


@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_vs_trl_sequence_level(trl_trainers, seed):
    lp, old, adv, mask = random_inputs(seed, spread=0.02)
    ref_loss, ref_grad, _ = _trl_loss(trl_trainers["gspo"], lp, old, adv, mask)
    loss, grad, _ = _ours("gspo", lp, old, adv, mask)
    torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_dr_grpo_vs_trl(trl_trainers, seed):
    # TRL's dr_grpo divides the token sum by B * max_completion_length (= 4 in the fixture).
    lp, old, adv, mask = random_inputs(seed, t=4)
    ref_loss, ref_grad, _ = _trl_loss(trl_trainers["dr_grpo"], lp, old, adv, mask)
    loss, grad, _ = _ours("grpo", lp, old, adv, mask, loss_agg="seq-mean-token-sum-norm", norm_length=4)
    torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_gmpo_vs_trl_experimental(trl_trainers, seed):
    lp, old, adv, mask = random_inputs(seed, spread=0.5)
    ref_loss, ref_grad, _ = _trl_loss(trl_trainers["gmpo"], lp, old, adv, mask)
    loss, grad, _ = _ours("gmpo", lp, old, adv, mask)
    torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0)
