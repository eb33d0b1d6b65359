"""Named presets of small, randomly initialised MoE models of each transformers family (no downloads).

The main preset mirrors the paper's small model in shape (8 experts, top-1 routing) at a size
this CPU trains in minutes; ``tiny-*`` presets exist for tests (one of each family, with a dense
layer wherever the family has that option, so that dense layers are exercised).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    family: str
    description: str
    make_config: Callable[[dict[str, Any]], PretrainedConfig]


_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _qwen3(hidden: int, layers: int, experts: int, top_k: int, moe_inter: int, **extra: Any):
    def make(tok: dict[str, Any]) -> PretrainedConfig:
        return Qwen3MoeConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            intermediate_size=2 * moe_inter,
            moe_intermediate_size=moe_inter,
            num_experts=experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=True,
            max_position_embeddings=256,
            rope_parameters=_ROPE,
            tie_word_embeddings=True,
            **extra,
            **tok,
        )

    return make


def _tiny(family: str) -> Callable[[dict[str, Any]], PretrainedConfig]:
    common = {
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }

    def make(tok: dict[str, Any]) -> PretrainedConfig:
        if family == "qwen3_moe":
            return Qwen3MoeConfig(
                **common,
                **tok,
                head_dim=8,
                intermediate_size=64,
                moe_intermediate_size=16,
                num_experts=8,
                num_experts_per_tok=2,
                mlp_only_layers=[1],
                norm_topk_prob=True,
            )
        if family == "qwen2_moe":
            return Qwen2MoeConfig(
                **common,
                **tok,
                intermediate_size=64,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=32,
                num_experts=8,
                num_experts_per_tok=2,
                mlp_only_layers=[1],
                norm_topk_prob=False,
            )
        if family == "mixtral":
            return MixtralConfig(**common, **tok, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
        if family == "olmoe":
            return OlmoeConfig(**common, **tok, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
        if family == "gpt_oss":
            return GptOssConfig(
                **common,
                **tok,
                head_dim=8,
                intermediate_size=16,
                num_local_experts=8,
                num_experts_per_tok=2,
                layer_types=["full_attention"] * 3,
                rope_parameters=_ROPE,
            )
        if family == "deepseek_v3":  # MLA: one key head per query head (grouped keys break generation)
            return DeepseekV3Config(
                **{**common, "num_key_value_heads": common["num_attention_heads"]},
                **tok,
                intermediate_size=64,
                moe_intermediate_size=16,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_group=2,
                topk_group=1,
                first_k_dense_replace=1,
                q_lora_rank=None,
                kv_lora_rank=16,
                qk_rope_head_dim=4,
                qk_nope_head_dim=4,
                v_head_dim=8,
                n_shared_experts=1,
                rope_parameters=_ROPE,
            )
        raise AssertionError(family)

    return make


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            "qwen3-moe-countdown",
            "qwen3_moe",
            "main testbed: Qwen3-MoE, hidden 128, 4 layers, 8 experts, top-1 (the paper's small-model shape)",
            _qwen3(128, 4, 8, 1, 256),
        ),
        ModelPreset(
            "qwen3-moe-countdown-top2",
            "qwen3_moe",
            "as qwen3-moe-countdown with top-2 routing",
            _qwen3(128, 4, 8, 2, 256),
        ),
        # The drift atlas: the countdown shape at equal total and active expert size (k x width = 256)
        ModelPreset(
            "qwen3-moe-e8k2", "qwen3_moe", "drift atlas: 8 experts, top-2, width 128", _qwen3(128, 4, 8, 2, 128)
        ),
        ModelPreset(
            "qwen3-moe-e16k2", "qwen3_moe", "drift atlas: 16 experts, top-2, width 128", _qwen3(128, 4, 16, 2, 128)
        ),
        ModelPreset(
            "qwen3-moe-e32k4", "qwen3_moe", "drift atlas: 32 experts, top-4, width 64", _qwen3(128, 4, 32, 4, 64)
        ),
        ModelPreset(
            "qwen3-moe-e64k8", "qwen3_moe", "drift atlas: 64 experts, top-8, width 32", _qwen3(128, 4, 64, 8, 32)
        ),
        ModelPreset(
            "qwen3-moe-100m",
            "qwen3_moe",
            "GPU check (make gpu-check): hidden 512, 8 layers, 32 experts, top-4, width 256 (about 110M parameters)",
            _qwen3(512, 8, 32, 4, 256),
        ),
        ModelPreset(
            "qwen3-moe-e32k4-l8",
            "qwen3_moe",
            "drift atlas: 32 experts, top-4, width 64, 8 layers",
            _qwen3(128, 8, 32, 4, 64),
        ),
        ModelPreset(
            "qwen3-moe-e64k8-l8",
            "qwen3_moe",
            "drift atlas: 64 experts, top-8, width 32, 8 layers",
            _qwen3(128, 8, 64, 8, 32),
        ),
        ModelPreset("tiny-qwen3-moe", "qwen3_moe", "test model; layer 1 dense (mlp_only_layers)", _tiny("qwen3_moe")),
        ModelPreset("tiny-qwen2-moe", "qwen2_moe", "test model; shared expert, layer 1 dense", _tiny("qwen2_moe")),
        ModelPreset("tiny-mixtral", "mixtral", "test model; always-renormalised top-2", _tiny("mixtral")),
        ModelPreset("tiny-olmoe", "olmoe", "test model", _tiny("olmoe")),
        ModelPreset("tiny-gpt-oss", "gpt_oss", "test model; top-k on raw logits, softmax over k", _tiny("gpt_oss")),
        ModelPreset(
            "tiny-deepseek-v3",
            "deepseek_v3",
            "test model; sigmoid router, grouped selection with bias, first layer dense",
            _tiny("deepseek_v3"),
        ),
    )
}


def list_presets() -> list[str]:
    return list(PRESETS)


def build_config(
    preset: str, vocab_size: int, pad_token_id: int = 0, eos_token_id: int = 1, bos_token_id: int | None = None
) -> PretrainedConfig:
    """The transformers config of ``preset`` for a tokenizer of ``vocab_size`` tokens."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    tok = {
        "vocab_size": vocab_size,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
        "bos_token_id": eos_token_id if bos_token_id is None else bos_token_id,
    }
    return PRESETS[preset].make_config(tok)


def build_model(preset: str, vocab_size: int, seed: int = 0, **token_ids: Any) -> PreTrainedModel:
    """A randomly initialised (seeded) float32 model of ``preset``."""
    cfg = build_config(preset, vocab_size, **token_ids)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): routed experts count only top_k / num_experts of their weights."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        experts = getattr(m, "experts", None)
        router = getattr(m, "gate", None) or getattr(m, "router", None)
        if experts is None or router is None or not hasattr(router, "top_k"):
            continue
        n = sum(p.numel() for p in experts.parameters())
        inactive += round(n * (1 - router.top_k / router.num_experts))
    return total, total - inactive


def presets_table(vocab_size: int = 32) -> str:
    """Every preset with its family, total and active parameters, MoE shape and router-trace bytes per token."""
    from rspo.routing import MoERouters

    lines = [
        f"{'preset':26s} {'family':12s} {'total':>10s} {'active':>10s} {'MoE layers':>10s} {'E':>3s} {'k':>2s}  "
        f"{'trace B/token':>13s}  description"
    ]
    for name, p in PRESETS.items():
        model = build_model(name, vocab_size)
        total, active = count_parameters(model)
        r = MoERouters(model)
        lines.append(
            f"{name:26s} {p.family:12s} {total:>10,d} {active:>10,d} {r.num_layers:>10d} {r.num_experts:>3d} "
            f"{r.top_k:>2d}  {r.bytes_per_token():>13d}  {p.description}"
        )
    return "\n".join(lines)
