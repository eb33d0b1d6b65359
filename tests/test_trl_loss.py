"""RSPOTrainer's loss against TRL's own GRPOTrainer._compute_loss on the same inputs (objective=grpo and
gspo, where TRL has the same objective): every GRPOConfig option that acts inside TRL's loss, the vLLM
importance-sampling ratio in each mode included; and the option classification, rejections and the check
of the TRL internals we rely on."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer

from rspo.correction import RolloutCorrection
from rspo.integrations.trl import (
    TRL_OPTIONS,
    RSPOConfig,
    RSPOTrainer,
    _grpo_fields,
    check_trl_internals,
    task_dataset,
    task_reward_func,
)
from rspo.policy import load_policy
from rspo.tasks import make_task

COUNTDOWN = make_task("countdown")
T_MAX = 14


@pytest.fixture(scope="module")
def batch(tiny_policy):
    """A real rollout batch of the tiny policy, an old policy (the model before a perturbation), and a
    'rollout engine' whose log-probs differ from the old pass by noise (the mismatch TRL corrects)."""
    pol = load_policy(tiny_policy)
    model, tok = pol.model, pol.tokenizer
    stream = COUNTDOWN.train_examples(seed=5)
    rows = [next(stream) for _ in range(4)]
    from rspo.logprobs import response_log_probs
    from rspo.routing.step import RoutingOptions, RoutingStep
    from rspo.sampler import HFSampler

    gen = HFSampler(pol).sample(
        [COUNTDOWN.prompt(x) for x in rows for _ in range(4)], max_new_tokens=T_MAX, temperature=1.0, seed=0
    )
    mask = gen.response_mask.long()
    s, t = gen.sequences.shape[1], mask.shape[1]
    with torch.no_grad(), RoutingStep(model, RoutingOptions()).capture(slice(s - t - 1, s - 1)) as rec:
        old, _, _ = response_log_probs(model, gen.sequences, gen.attention_mask, t, entropy=False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        sampling = old + 0.3 * torch.randn(old.shape, generator=g)  # some tokens' ratios leave [0.5, 2]
        sampling = torch.where(mask > 0, sampling.clamp(max=0.0), torch.zeros_like(old))
        for p in model.parameters():  # the policy moved since the old pass: ratios are not 1
            p.add_(0.03 * torch.randn(p.shape, generator=g))
    adv = torch.randn(mask.shape[0], generator=g)
    p = gen.prompt_len
    # num_items_in_batch: the generation batch's tokens, in two micro-batches (the other one 10 tokens longer)
    inputs = {
        "prompt_ids": gen.sequences[:, :p],
        "prompt_mask": gen.attention_mask[:, :p],
        "completion_ids": gen.sequences[:, p:],
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "sampling_per_token_logps": sampling,
        "num_items_in_batch": mask.sum() * 2 + 10,
        "router_old_idx": rec.trace.topk_idx,
        "router_old_logp": rec.trace.logp,
    }
    return model, tok, rows, inputs


def _trl_is_ratio(old, sampling, mask, mode, lo, hi):
    """TRL 1.16's vLLM importance-sampling ratio (GRPOTrainer._generate_and_score_completions), transcribed."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    r = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(r, min=lo, max=hi)
    bad = (r < (lo if lo is not None else -math.inf)) | (r > (hi if hi is not None else math.inf))
    return r.masked_fill(bad, 0.0)


def _trainer(cls, cfg_cls, model, tok, rows, tmp_path, **kw):
    args = dict(
        output_dir=str(tmp_path / cls.__name__),
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        per_device_train_batch_size=8,
        steps_per_generation=2,
        num_generations=4,
        max_completion_length=T_MAX,
        max_steps=1,
        learning_rate=1e-3,
        save_strategy="no",
        seed=0,
        beta=0.0,
    )
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(
            model=copy.deepcopy(model),
            reward_funcs=task_reward_func(COUNTDOWN, rows),
            args=cfg_cls(**args),
            train_dataset=task_dataset(COUNTDOWN, rows),
            processing_class=tok,
        )


IS_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
CASES = {
    **{f"vllm_{m}": {"vllm": m} for m in IS_MODES},
    "vllm_token_truncate_min": {"vllm": "token_truncate", "vllm_importance_sampling_clip_min": 0.8},
    "loss_dapo": {"loss_type": "dapo"},
    "loss_bnpo": {"loss_type": "bnpo"},
    "loss_grpo": {"loss_type": "grpo"},
    "loss_dr_grpo": {"loss_type": "dr_grpo"},
    "epsilon_high_delta": {"epsilon": 0.1, "epsilon_high": 0.2, "delta": 1.25},
    "top_entropy_quantile": {"top_entropy_quantile": 0.4},
    "off_policy_mask": {"off_policy_mask_threshold": 0.02},
    "beta_bias_corrected": {"beta": 0.05},
    "beta_plain_grpo": {"beta": 0.05, "use_bias_correction_kl": False, "loss_type": "grpo"},
    "entropy_coef": {"entropy_coef": 0.01, "top_entropy_quantile": 0.5},
    "aux_loss": {"router_aux_loss_coef": 0.01},
    "everything": {
        "vllm": "token_mask",
        "vllm_importance_sampling_clip_min": 0.5,
        "off_policy_mask_threshold": 0.02,
        "top_entropy_quantile": 0.6,
        "beta": 0.05,
        "entropy_coef": 0.01,
        "delta": 1.5,
        "router_aux_loss_coef": 0.01,
    },
}
GSPO = {"importance_sampling_level": "sequence", "loss_type": "grpo", "epsilon": 3e-3, "epsilon_high": 4e-3}
GSPO_CASES = {
    "gspo": {},
    "gspo_vllm_token_truncate": {"vllm": "token_truncate"},
    "gspo_vllm_sequence_mask": {"vllm": "sequence_mask"},
    "gspo_beta_bias_corrected": {"beta": 0.05, "top_entropy_quantile": 0.5},
}


def _compare(batch, tmp_path, objective, kw, accum):
    model, tok, rows, inputs = batch
    kw = dict(kw)
    mode = kw.pop("vllm", None)
    inputs = dict(inputs)
    if mode is not None:
        kw["vllm_importance_sampling_mode"] = mode
        lo, hi = kw.get("vllm_importance_sampling_clip_min"), 3.0 if mode.endswith("truncate") else 2.0
        kw["vllm_importance_sampling_clip_max"] = hi
        m = inputs["completion_mask"].float()
        old, sampling = inputs["old_per_token_logps"], inputs["sampling_per_token_logps"]
        inputs["importance_sampling_ratio"] = _trl_is_ratio(old, sampling, m, mode, lo, hi)
    if kw.get("beta"):
        with torch.no_grad():  # the reference: the unperturbed-ish policy's log-probs, any fixed tensor will do
            inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] - 0.05
    trl_kw = {**kw, **(GSPO if objective == "gspo" else {})}
    ours_kw = {**kw, "objective": objective}
    if objective == "gspo":
        ours_kw.update(epsilon=GSPO["epsilon"], epsilon_high=GSPO["epsilon_high"])
    if "router_aux_loss_coef" not in kw:
        trl_kw["router_aux_loss_coef"] = 0.0  # TRL's default is the model config's; ours is 0
    out = {}
    for name, cls, cfg, args in (("trl", GRPOTrainer, GRPOConfig, trl_kw), ("ours", RSPOTrainer, RSPOConfig, ours_kw)):
        tr = _trainer(cls, cfg, model, tok, rows, tmp_path / name, **args)
        tr.use_vllm = mode is not None  # no vLLM here: the ratio is injected, as TRL would have computed it
        tr.model.train()
        tr.current_gradient_accumulation_steps = accum
        loss = tr._compute_loss(tr.model, inputs)
        loss.backward()
        grads = {n: q.grad.clone() for n, q in tr.model.named_parameters() if q.grad is not None}
        out[name] = (loss.detach(), grads, {k: v[-1] for k, v in tr._metrics["train"].items() if v})
    return out


def _assert_equal(out):
    (la, ga, ma), (lb, gb, mb) = out["trl"], out["ours"]
    assert math.isfinite(float(la)) and float(la) != 0.0
    # TRL and we score tokens in the same forward; the objectives differ only in float32 rounding
    torch.testing.assert_close(lb, la, atol=1e-6, rtol=1e-5)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-7, rtol=1e-4, msg=n)
    for k in ("kl", "entropy", "aux_loss", "policy_loss", "entropy_coef"):
        if k in ma:
            assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-7), k


@pytest.fixture(scope="module")
def plain_loss(batch, tmp_path_factory) -> float:
    return float(_compare(batch, tmp_path_factory.mktemp("plain"), "grpo", {}, accum=1)["trl"][0])


@pytest.mark.parametrize("case", list(CASES))
def test_grpo_equals_trl(batch, tmp_path, case, plain_loss):
    out = _compare(batch, tmp_path, "grpo", CASES[case], accum=1)
    _assert_equal(out)
    if case != "loss_dapo":  # (TRL's default) every option changes the loss on this batch: no vacuous pass
        assert abs(float(out["trl"][0]) - plain_loss) > 1e-5


@pytest.mark.parametrize("case", list(GSPO_CASES))
def test_gspo_equals_trl_gspo(batch, tmp_path, case):
    _assert_equal(_compare(batch, tmp_path, "gspo", GSPO_CASES[case], accum=2))


def test_accumulation_scaling_of_dapo(batch, tmp_path):
    """dapo divides by TRL's global normaliser (num_items_in_batch x accumulation / steps_per_generation)."""
    _assert_equal(_compare(batch, tmp_path, "grpo", {"loss_type": "dapo", "beta": 0.05}, accum=4))


@pytest.mark.parametrize("mode", IS_MODES)
def test_our_correction_equals_trls_ratio(batch, mode):
    _, _, _, inputs = batch
    old, sampling, mask = inputs["old_per_token_logps"], inputs["sampling_per_token_logps"], inputs["completion_mask"]
    lo, hi = (0.8, 2.0) if mode.endswith("mask") else (None, 3.0)
    ref = _trl_is_ratio(old, sampling, mask.float(), mode, lo, hi)
    w, m = RolloutCorrection.from_trl(mode, lo, hi).weights(old, sampling, mask)
    w = w if w.dim() == 2 else w[:, None]
    keep = mask > 0 if ref.shape == mask.shape else torch.ones_like(ref, dtype=torch.bool)
    torch.testing.assert_close(w[keep], ref[keep], atol=0, rtol=1e-6)
    if mode.endswith("mask"):
        assert 0 < m["rollout/masked_frac"] < 1  # the bounds act on this batch


# ------------------------------------------------------------------------ options
def test_every_grpo_option_is_classified():
    fields, known = set(_grpo_fields()), set(TRL_OPTIONS)
    assert not fields - known, f"GRPOConfig options new to this TRL, classify them in TRL_OPTIONS: {fields - known}"
    assert not known - fields, f"TRL_OPTIONS names options GRPOConfig no longer has: {known - fields}"


def test_an_unknown_option_set_is_an_error(monkeypatch):
    import rspo.integrations.trl as mod

    monkeypatch.setattr(mod, "TRL_OPTIONS", {k: v for k, v in TRL_OPTIONS.items() if k != "top_k"})
    RSPOConfig(output_dir="x", use_cpu=True)  # at its default: fine
    with pytest.raises(ValueError, match=r"\['top_k'\] are not known to rspo's TRL adapter"):
        RSPOConfig(output_dir="x", use_cpu=True, top_k=5)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"use_adaptive_entropy": True}, "use_adaptive_entropy=True: RSPOTrainer does not support it"),
        ({"entropy_target": 0.5}, "entropy_target=0.5: RSPOTrainer does not support it"),
        ({"sapo_temperature_pos": 2.0}, "sapo_temperature_pos"),
        ({"vespo_k_neg": 1.0}, "vespo_k_neg"),
        ({"loss_type": "cispo"}, "loss_type='cispo' is its own objective"),
        ({"loss_type": "sapo", "objective": "grpo"}, "loss_type='sapo' is its own objective"),
        ({"loss_type": "bogus", "objective": "grpo"}, "loss_type='bogus'; valid: dapo"),
        ({"loss_type": "dapo", "objective": "gspo"}, "does not apply to the sequence objective 'gspo'"),
        ({"importance_sampling_level": "token"}, "contradicts objective 'rspo'"),
        ({"importance_sampling_level": "sequence", "objective": "grpo"}, "contradicts objective 'grpo'"),
        ({"delta": 2.0}, "delta .* does not apply to 'rspo'"),
        ({"delta": 1.1, "objective": "grpo"}, "delta must be a number > 1 \\+ epsilon_high"),
        ({"rollout_weights_reduce": "geometric", "objective": "grpo"}, "rollout_weights_reduce applies to sequence"),
        ({"epsilon": -0.1, "objective": "grpo"}, "epsilon must be a finite number >= 0"),
        ({"rollout_weights_reduce": "median"}, "rollout_weights_reduce='median'"),
    ],
)
def test_options_that_cannot_apply_are_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        RSPOConfig(output_dir="x", use_cpu=True, **kw)


def test_resolved_defaults():
    c = RSPOConfig(output_dir="x", use_cpu=True, objective="grpo")
    assert (c.loss_type, c.importance_sampling_level, c.epsilon, c.epsilon_high) == ("dapo", "token", 0.2, 0.2)
    c = RSPOConfig(output_dir="x", use_cpu=True, objective="rspo")
    assert (c.loss_type, c.importance_sampling_level, c.router_aux_loss_coef) == ("grpo", "sequence", 0.0)
    c = RSPOConfig(output_dir="x", use_cpu=True, objective="gspo", epsilon=1e-3)
    assert (c.epsilon, c.epsilon_high) == (1e-3, 4e-4) and c.objective_hparams()["clip_low"] == 1e-3


def test_aux_loss_off_by_default_and_trls_on_request(tiny_policy, tmp_path):
    pol = load_policy(tiny_policy)
    rows = [next(COUNTDOWN.train_examples(seed=1))] * 4
    tr = _trainer(RSPOTrainer, RSPOConfig, pol.model, pol.tokenizer, rows, tmp_path / "a")
    assert not tr.aux_loss_enabled
    tr = _trainer(RSPOTrainer, RSPOConfig, pol.model, pol.tokenizer, rows, tmp_path / "b", router_aux_loss_coef=None)
    coef = pol.model.config.router_aux_loss_coef
    assert coef > 0 and tr.aux_loss_enabled and tr.router_aux_loss_coef == coef  # TRL's: the model config's


def test_changed_trl_internals_fail_clearly():
    check_trl_internals()  # the installed TRL matches

    class Moved(GRPOTrainer):
        def _compute_loss(self, model, batch, num_items):  # a changed signature
            raise AssertionError

    with pytest.raises(RuntimeError, match=r"_compute_loss\('self', 'model', 'inputs'\) is now _compute_loss"):
        check_trl_internals(Moved)

    class Gone(GRPOTrainer):
        get_off_policy_mask = None

    with pytest.raises(RuntimeError, match="trl>=1.16,<1.17.*get_off_policy_mask is gone"):
        check_trl_internals(Gone)


def test_missing_trl_attribute_fails_clearly(tiny_policy, tmp_path, monkeypatch):
    import rspo.integrations.trl as mod

    pol = load_policy(tiny_policy)
    rows = [next(COUNTDOWN.train_examples(seed=1))] * 4
    monkeypatch.setattr(mod, "TRL_ATTRIBUTES", (*mod.TRL_ATTRIBUTES, "_renamed_in_a_newer_trl"))
    with pytest.raises(RuntimeError, match=r"trl>=1.16,<1.17; this GRPOTrainer has no \['_renamed_in_a_newer_trl'\]"):
        _trainer(RSPOTrainer, RSPOConfig, pol.model, pol.tokenizer, rows, tmp_path)
