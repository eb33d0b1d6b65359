"""Policies of every MoE family with a real BPE tokenizer (trained here, with a chat template): loading,
rendering, stop ids and strings, response log-probs (values, gradients, memory at real vocabulary
sizes), `rspo train` on the math task and `rspo eval` on two benchmarks; dense models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rspo.cli import main
from rspo.config import build
from rspo.errors import ModelError
from rspo.lab.presets import build_model
from rspo.lab.tokenizer import build_bpe_tokenizer
from rspo.logprobs import response_log_probs
from rspo.policy import load_policy, policy_of
from rspo.rundir import read_metrics
from rspo.sampler import HFSampler
from rspo.tasks import make_task
from rspo.train_config import TrainConfig
from rspo.trainer import Trainer
from tests.conftest import FAMILIES

ARITH_TRAIN, ARITH_TEST, SAMPLE = (f"builtin:math/{n}.jsonl" for n in ("arith-train", "arith-test", "sample-plain"))


def test_bpe_tokenizer_and_chat_template(bpe):
    assert build_bpe_tokenizer().get_vocab() == bpe.get_vocab()  # deterministic
    text = bpe.apply_chat_template(
        [{"role": "user", "content": "What is $2+3$?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nWhat is $2+3$?<|im_end|>\n<|im_start|>assistant\n"
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    assert bpe.convert_tokens_to_ids("<|im_start|>") in ids and bpe.eos_token_id in ids
    assert bpe.decode(ids) == text and bpe.padding_side == "left"


@pytest.mark.parametrize("preset", FAMILIES)
def test_load_render_and_sample_every_family(family_dirs, preset):
    pol = load_policy(family_dirs[preset])
    assert pol.stop_ids == (pol.tokenizer.eos_token_id, pol.tokenizer.pad_token_id)
    task = make_task("math", {"eval": {"a": ARITH_TEST}, "max_new_tokens": 12})
    exs = task.eval_examples("a")[:6]
    ids, am = pol.encode([task.prompt(x) for x in exs])
    assert ids.shape[0] == 6 and bool((am[:, -1] == 1).all())  # left padding: every prompt ends at P
    assert pol.render(task.prompt(exs[0])).endswith("<|im_start|>assistant\n")
    gen = HFSampler(pol).sample([task.prompt(x) for x in exs], max_new_tokens=12, seed=0)
    lengths = gen.response_mask.sum(1)
    assert gen.sequences.shape == (6, ids.shape[1] + gen.response_mask.shape[1])
    for row, n, text in zip(gen.sequences[:, ids.shape[1] :], lengths, gen.texts, strict=True):
        toks = row[: int(n)].tolist()
        stops = [i for i, t in enumerate(toks) if t in pol.stop_ids]
        assert stops in ([], [len(toks) - 1])  # a response ends at its first stop id, included
        assert (row[int(n) :] == pol.pad_id).all()
        assert text == pol.tokenizer.decode(toks, skip_special_tokens=True)


def test_stop_strings_end_the_response(tiny_policy):
    pol = load_policy(tiny_policy)
    task = make_task("countdown")
    prompts = [task.prompt(p) for p in task.eval_examples("validation")[:24]]
    plain = HFSampler(pol).sample(prompts, max_new_tokens=30, seed=3)
    cut = HFSampler(pol).sample(prompts, max_new_tokens=30, seed=3, stop_strings=["+"])
    assert any("+" in a for a in plain.texts)
    p = cut.prompt_len
    for i, (a, b) in enumerate(zip(plain.texts, cut.texts, strict=True)):
        n = int(cut.response_mask[i].sum())
        assert pol.tokenizer.decode(cut.sequences[i, p : p + n], skip_special_tokens=True) == b  # mask = text
        if "+" in a:  # cut right after the first "+", which stays in the response
            assert b == a[: a.index("+") + 1]
        else:
            assert b == a
    assert cut.sequences.shape[1] <= plain.sequences.shape[1]


def test_hub_id_is_passed_to_transformers_and_fails_clearly_offline():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "rspo.cli", "eval", "model=someorg/no-such-model", "limit=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "cannot load the tokenizer of 'someorg/no-such-model'" in r.stderr
    with pytest.raises(ModelError, match="does not exist"):
        load_policy("./not/here")
    with pytest.raises(ModelError, match="device=cuda but torch sees no CUDA device"):
        load_policy("base", device="cuda") if not torch.cuda.is_available() else pytest.skip("a GPU is present")


# ----------------------------------------------------------------------------------------
# Response log-probs: values, gradients, and memory at a real vocabulary size
# ----------------------------------------------------------------------------------------
def _naive_float(model, ids, am, t):
    logits = model(input_ids=ids, attention_mask=am).logits[:, -t - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, ids[:, -t:, None]).sum()


def _naive(model, ids, am, t):
    logits = model(input_ids=ids, attention_mask=am).logits[:, -t - 1 : -1].double()
    lsm = torch.log_softmax(logits, -1)
    return lsm.gather(-1, ids[:, -t:, None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


def test_response_log_probs_equal_the_naive_computation(bpe):
    """Against log_softmax of the full-sequence logits in float64 (the model runs in float32: grouped_mm,
    the experts kernel, has no float64; the exact float64 check of the op itself is the next test)."""
    torch.manual_seed(0)
    model = build_model("tiny-qwen3-moe", len(bpe), pad_token_id=0, eos_token_id=2)
    ids = torch.randint(3, len(bpe), (3, 11))
    am = torch.ones_like(ids)
    am[0, :2] = 0  # left padding
    logp, ent, _ = response_log_probs(model, ids, am, 5)
    ref_logp, ref_ent = _naive(model, ids, am, 5)
    torch.testing.assert_close(logp.double(), ref_logp, atol=2e-6, rtol=0)  # float32 rounding of a logsumexp
    torch.testing.assert_close(ent.double(), ref_ent, atol=2e-5, rtol=0)
    w = torch.randn(3, 5, dtype=torch.float64)
    g1 = torch.autograd.grad((logp.double() * w).sum(), model.lm_head.weight)[0]
    g2 = torch.autograd.grad((ref_logp * w).sum(), model.lm_head.weight)[0]
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_head_op_in_float64_equals_log_softmax_exactly(with_bias, temperature):
    from rspo.logprobs import _FusedHeadLogProb

    g = torch.Generator().manual_seed(1)
    n, h, v = 37, 6, 50
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    tgt = torch.randint(0, v, (n,), generator=g)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    import rspo.logprobs as pol_mod

    old, pol_mod.CHUNK_BYTES = pol_mod.CHUNK_BYTES, 4 * v * 8  # 8 tokens per chunk: several chunks
    try:
        logp, ent = _FusedHeadLogProb.apply(hidden, weight, bias, tgt, True, temperature)
    finally:
        pol_mod.CHUNK_BYTES = old
    lsm = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias) / temperature, -1)
    ref = lsm.gather(-1, tgt[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, -(lsm.exp() * lsm).sum(-1).detach(), atol=1e-12, rtol=0)
    params = [hidden, weight] + ([bias] if with_bias else [])
    ga = torch.autograd.grad((logp * w).sum(), params)
    gb = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert not ent.requires_grad


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampler_log_probs_equal_the_trainers(tiny_policy, temperature, top_p):
    """The sampler reports log-probs under softmax(logits / T) (before top-p); the trainer's scoring of the same
    tokens at T agrees up to float32 numerics (KV cache vs one full forward): the rollout-correction ratio is 1."""
    pol = load_policy(tiny_policy)
    task = make_task("countdown")
    prompts = [task.prompt(p) for p in task.eval_examples("validation")[:12]]
    gen = HFSampler(pol).sample(prompts, max_new_tokens=20, seed=5, temperature=temperature, top_p=top_p)
    assert gen.logprobs is not None and gen.logprobs.shape == gen.response_mask.shape
    assert bool((gen.logprobs[gen.response_mask == 0] == 0).all())
    with torch.no_grad():
        ref, _, _ = response_log_probs(
            pol.model, gen.sequences, gen.attention_mask, gen.response_mask.shape[1], temperature=temperature
        )
    sel = gen.response_mask > 0
    torch.testing.assert_close(gen.logprobs[sel], ref[sel], atol=2e-5, rtol=0)
    # at another temperature the scores differ: the temperature is really applied on both sides
    other, _, _ = response_log_probs(pol.model, gen.sequences, gen.attention_mask, gen.response_mask.shape[1])
    if temperature != 1.0:
        assert (other[sel] - gen.logprobs[sel]).abs().max() > 1e-2
    assert HFSampler(pol).sample(prompts[:2], max_new_tokens=5, greedy=True).logprobs is None


def test_memory_at_a_150k_vocabulary_holds_no_vocabulary_sized_tensor():
    """At a 150k vocabulary: no tensor with a vocabulary dimension is kept for the backward and the output
    layer never runs on the whole sequence (peak memory, measured side by side with the naive computation,
    is in benchmarks/logprob_memory.py)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    v, b, p, t = 150_000, 4, 40, 64
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=v,
            hidden_size=16,
            intermediate_size=32,
            moe_intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=True,
        )
    )
    ids = torch.randint(0, v, (b, p + t))
    am = torch.ones_like(ids)
    head_calls = []
    model.lm_head.register_forward_hook(lambda m, i, o: head_calls.append(tuple(o.shape)))
    params = {q.data_ptr() for q in model.parameters()}  # the (tied) head weight is a parameter, not memory

    def saved_vocab_bytes(fn) -> int:
        seen: dict[tuple, int] = {}

        def pack(x):
            if x.dim() and v in x.shape and x.data_ptr() not in params:
                seen[(x.data_ptr(), tuple(x.shape))] = x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn()
        loss.backward()
        return sum(seen.values())

    logp, ent, _ = response_log_probs(model, ids, am, t)
    assert logp.shape == ent.shape == (b, t) and head_calls == []  # the head ran only inside the fused op
    assert saved_vocab_bytes(lambda: response_log_probs(model, ids, am, t)[0].sum()) == 0
    naive = saved_vocab_bytes(lambda: _naive_float(model, ids, am, t))
    assert naive >= b * t * v * 4  # what the check catches: log-softmax keeps a (B, T, V) tensor
    assert head_calls[-1] == (b, p + t, v)  # and the naive path ran the head on every position


# ----------------------------------------------------------------------------------------
# Training and evaluation on the math task, every family
# ----------------------------------------------------------------------------------------
def math_cfg(model: str, out, **extra) -> TrainConfig:
    data = {
        "model": model,
        "out_dir": str(out),
        "steps": 2,
        "mini_batch_size": 8,
        "eval_every": 2,
        "eval_problems": 4,
        "threads": 1,
        "optim": {"lr": 1e-2},
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 10},
        "task": {
            "name": "math",
            "options": {
                "train": [ARITH_TRAIN],
                "eval": {"arith": ARITH_TEST},
                "reward_fn": "tests.helpers:length_reward",
            },
        },
    }
    data.update(extra)
    return build(TrainConfig, data)


@pytest.mark.parametrize("preset", FAMILIES)
def test_train_on_the_math_task_every_family(family_dirs, tmp_path, preset):
    tr = Trainer(math_cfg(family_dirs[preset], tmp_path / "run"), progress=False)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    changed = [n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert 0 < r["router/gamma_mean"] <= 1 and 0 <= r["router/non_shifted_ratio"] <= 1
        assert "router/load_max_ratio" in r and "offpolicy/router_gamma_mean" in r
        assert r["reward/std"] > 0  # the user reward varies, so there is a gradient
    assert "val/accuracy" in rows[-1]


def test_eval_two_benchmarks_with_pass_at_k(family_dirs, tmp_path, capsys):
    out = tmp_path / "ev"
    d = family_dirs["tiny-qwen3-moe"]
    assert (
        main(
            [
                "eval",
                f"model={d}",
                "task.name=math",
                f"task.options.eval.arith={ARITH_TEST}",
                f"task.options.eval.sample={SAMPLE}",
                "n=4",
                "temperature=0.8",
                "limit=5",
                "max_new_tokens=8",
                "threads=1",
                "task.options.reward_fn=tests.helpers:length_reward",
                f"out_dir={out}",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())["results"]
    assert set(res) == {"arith", "sample", "average"}
    for name in ("arith", "sample"):
        rows = [json.loads(x) for x in (out / f"responses-{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 5 + 5 * 4
        sampled = [r for r in rows if r["mode"] != "greedy"]
        assert res[name]["avg@4"] == pytest.approx(sum(r["correct"] for r in sampled) / 20, abs=1e-12)
        assert set(res[name]) == {"examples", "greedy_pass@1", "avg@4", "pass@2", "pass@4"}
        assert res[name]["pass@4"] >= res[name]["pass@2"] >= res[name]["avg@4"] - 1e-12
    assert res["average"]["avg@4"] == pytest.approx((res["arith"]["avg@4"] + res["sample"]["avg@4"]) / 2)
    assert "| average |" in (out / "results.md").read_text()


# ----------------------------------------------------------------------------------------
# Dense models, bfloat16
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dense_dir(bpe, tmp_path_factory) -> str:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    d = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=len(bpe),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        pad_token_id=bpe.pad_token_id,
        eos_token_id=bpe.eos_token_id,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(d)
    bpe.save_pretrained(d)
    return str(d)


def test_dense_model_trains_without_router_and_refuses_router_options(dense_dir, tmp_path):
    tr = Trainer(math_cfg(dense_dir, tmp_path / "d", objective={"name": "grpo"}), progress=False)
    assert not tr.routing.active
    tr.train()
    rows = read_metrics(tmp_path / "d")
    assert not any(k.startswith("router/") for r in rows for k in r) and rows[-1]["step"] == 2
    for extra, what in (
        ({"objective": {"name": "rspo"}}, "router shift"),
        ({"objective": {"name": "grpo"}, "routing": {"control": "freeze"}}, "routing control 'freeze'"),
        ({"objective": {"name": "grpo"}, "log_router": True}, "log_router"),
    ):
        with pytest.raises(ModelError, match=f"Qwen3ForCausalLM is a dense model .*: {what} needs an MoE model"):
            Trainer(math_cfg(dense_dir, tmp_path / "x", **extra), progress=False)
        assert not (tmp_path / "x").exists()


def test_bfloat16_policy_trains(family_dirs, tmp_path):
    tr = Trainer(
        math_cfg(family_dirs["tiny-qwen3-moe"], tmp_path / "bf", dtype="bfloat16", steps=1, eval_every=0),
        progress=False,
    )
    assert next(tr.model.parameters()).dtype == torch.bfloat16
    tr.train()
    row = read_metrics(tmp_path / "bf")[-1]
    assert math.isfinite(row["loss/policy"]) and math.isfinite(row["grad/norm"])


def test_policy_of_a_model_in_memory(bpe):
    model = build_model("tiny-olmoe", len(bpe), pad_token_id=bpe.pad_token_id, eos_token_id=bpe.eos_token_id)
    pol = policy_of(model, bpe)
    assert pol.device.type == "cpu" and pol.dtype == torch.float32 and pol.stop_ids == (bpe.eos_token_id,)


def test_train_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for field in (
        "device: auto | cpu | cuda = auto",
        "task.name: str = countdown",
        "router_shift.gamma_min",
        "rollout.max_new_tokens: int | null = null",
        "scoring.timeout_s",
    ):
        assert field in out, field
