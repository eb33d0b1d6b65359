"""Router semantics of the transformers (5.x) MoE families.

In every supported family the router is a module whose forward returns
``(router_logits (N, E), weights (N, k), indices (N, k))`` for the N = B*S tokens of the call,
and the experts consume ``(indices, weights)``. What differs is how probabilities and weights
come from the logits:

| family | router probability r (the default for the shift) | weights the experts get |
|---|---|---|
| qwen3_moe, qwen2_moe, olmoe | softmax over all E | softmax at top-k, renormalised if ``norm_topk_prob`` |
| mixtral | softmax over all E | softmax at top-k, always renormalised |
| gpt_oss | softmax over all E | top-k on raw logits, softmax over the k |
| deepseek_v3 | sigmoid score | sigmoid at top-k of (score + bias) in groups, renormalised, x scale |

``prob='topk_renorm'`` uses instead the probability renormalised over the old top-K set:
r_k / sum_{j in S_old} r_j (for gpt_oss this equals its weights).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rspo.errors import ModelError

Tensor = torch.Tensor
RouterProb = Literal["full", "topk_renorm"]


@dataclass(frozen=True)
class RouterFamily:
    """How one MoE family turns router logits into probabilities and expert weights."""

    model_type: str
    router_class: str
    score: Literal["softmax", "sigmoid"]
    weights: Literal["softmax_topk", "softmax_topk_renorm", "softmax_over_k", "sigmoid_deepseek"]

    def log_probs(self, logits: Tensor) -> Tensor:
        """Router log-probabilities over all experts, ``(N, E)`` float32 (log-sigmoid for sigmoid routers)."""
        return score_log_probs(self.score, logits)

    def selection_scores(self, router: nn.Module, logits: Tensor) -> Tensor:
        """The scores whose top-k the family selects (used only when K differs from the model's top-k)."""
        if self.score == "sigmoid":
            return logits.float().sigmoid() + router.e_score_correction_bias
        return logits.float()

    def weights_at(self, router: nn.Module, logits: Tensor, idx: Tensor) -> Tensor:
        """Expert weights the family would give to experts ``idx`` ``(N, k)``: for routing replay.

        Mirrors the family's router forward op for op, so that with the router's own indices the
        result is bit-identical to what the router returns.
        """
        if self.weights == "softmax_over_k":  # gpt_oss
            top = logits.gather(-1, idx)
            return torch.nn.functional.softmax(top, dim=1, dtype=top.dtype)
        if self.weights == "sigmoid_deepseek":
            w = logits.sigmoid().gather(1, idx)
            if router.norm_topk_prob:
                w /= w.sum(dim=-1, keepdim=True) + 1e-20
            return w * router.routed_scaling_factor
        if self.weights == "softmax_topk_renorm":  # mixtral: float softmax, always renormalised, stays float32
            w = torch.nn.functional.softmax(logits.float(), dim=-1).gather(-1, idx)
            w /= w.sum(dim=-1, keepdim=True)
            return w
        w = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1).gather(-1, idx)
        if router.norm_topk_prob:
            w /= w.sum(dim=-1, keepdim=True)
        return w.to(logits.dtype)


FAMILIES: dict[str, RouterFamily] = {
    f.model_type: f
    for f in (
        RouterFamily("qwen3_moe", "Qwen3MoeTopKRouter", "softmax", "softmax_topk"),
        RouterFamily("qwen2_moe", "Qwen2MoeTopKRouter", "softmax", "softmax_topk"),
        RouterFamily("olmoe", "OlmoeTopKRouter", "softmax", "softmax_topk"),
        RouterFamily("mixtral", "MixtralTopKRouter", "softmax", "softmax_topk_renorm"),
        RouterFamily("gpt_oss", "GptOssTopKRouter", "softmax", "softmax_over_k"),
        RouterFamily("deepseek_v3", "DeepseekV3TopkRouter", "sigmoid", "sigmoid_deepseek"),
    )
}


def looks_moe(model: nn.Module) -> bool:
    """Whether ``model`` has modules named like a router or an MoE block (supported family or not)."""
    return any("router" in type(m).__name__.lower() or "moe" in type(m).__name__.lower() for m in model.modules())


def family_of(model: nn.Module) -> RouterFamily:
    """The router family of ``model`` (from ``config.model_type``); clear errors otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if looks_moe(model):
        raise ModelError(
            f"{type(model).__name__} (model_type={model_type!r}) has MoE modules but its router family is not "
            f"supported; supported model types: {', '.join(FAMILIES)}"
        )
    raise ModelError(
        f"{type(model).__name__} (model_type={model_type!r}) has no MoE layer: router data needs a Mixture-of-"
        f"Experts model ({', '.join(FAMILIES)})"
    )


def adapt_split_routers(model: nn.Module) -> int:
    """Version shim, transformers < 5.11 (verl's range): there ``DeepseekV3TopkRouter`` returns the logits
    only and the group-limited top-k lives in ``DeepseekV3MoE.route_tokens_to_experts``. Give each such
    router the contract of the other families and of later transformers, ``(logits, weights, indices)``,
    and let its MoE block consume that output: the same operations in the same order (outputs unchanged,
    tested), so capture, gather and replay hooks on the router work. Returns the number of blocks adapted
    (0 with transformers >= 5.11, whose router already does this)."""
    n = 0
    for moe in model.modules():
        gate = getattr(moe, "gate", None)
        if type(moe).__name__ != "DeepseekV3MoE" or gate is None or hasattr(gate, "top_k"):
            continue
        if not hasattr(moe, "route_tokens_to_experts"):
            raise ModelError(
                "DeepseekV3MoE of this transformers version has neither a top-k router nor "
                "route_tokens_to_experts: unsupported; use transformers >= 5.5.3"
            )
        gate.num_experts, gate.top_k = moe.n_routed_experts, moe.top_k
        gate.norm_topk_prob, gate.routed_scaling_factor = moe.norm_topk_prob, moe.routed_scaling_factor
        gate.num_group, gate.topk_group = moe.n_group, moe.topk_group
        # bound methods and an unregistered back-reference: deepcopy rebinds them to the copy
        object.__setattr__(gate, "_rspo_moe", moe)
        gate.forward = types.MethodType(_split_router_forward, gate)
        moe.forward = types.MethodType(_split_moe_forward, moe)
        n += 1
    return n


def _split_router_forward(gate: nn.Module, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    logits = type(gate).forward(gate, hidden_states)
    idx, w = gate._rspo_moe.route_tokens_to_experts(logits)
    return logits, w, idx


def _split_moe_forward(moe: nn.Module, hidden_states: Tensor) -> Tensor:
    """DeepseekV3MoE.forward of transformers 5.10, with the router's split output."""
    residuals, shape = hidden_states, hidden_states.shape
    _, w, idx = moe.gate(hidden_states)
    out = moe.experts(hidden_states.view(-1, hidden_states.shape[-1]), idx, w).view(*shape)
    return out + moe.shared_experts(residuals)


def score_log_probs(score: Literal["softmax", "sigmoid"], logits: Tensor) -> Tensor:
    """Router log-probabilities over all experts ``(N, E)`` under a score function: log-softmax, or log-sigmoid
    (each expert's own score); float32, or float64 for float64 logits."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    return torch.nn.functional.logsigmoid(x) if score == "sigmoid" else torch.log_softmax(x, dim=-1)


def router_log_probs_at(
    family: RouterFamily | Literal["softmax", "sigmoid"], logits: Tensor, idx: Tensor, prob: RouterProb = "full"
) -> Tensor:
    """log r at experts ``idx`` ``(N, K)`` from logits ``(N, E)``: full probability or renormalised over idx.
    ``family``: a transformers family, or a score function by name (Megatron-Core's routers)."""
    score = family if isinstance(family, str) else family.score
    lp = score_log_probs(score, logits).gather(-1, idx)
    if prob == "topk_renorm":
        lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
    return lp
