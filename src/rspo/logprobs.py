"""Response log-probs without a ``(B, T, V)`` tensor: the output layer runs only at the positions that score
the response, chunk by chunk inside a fused autograd function that recomputes each chunk's logits in the
backward. Memory stays at one chunk of logits in the forward and the backward.

    logp, entropy, aux = response_log_probs(model, sequences, attention_mask, T, temperature=1.0)
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

Tensor = torch.Tensor


CHUNK_BYTES = 1 << 26
"""Float32 logits of one chunk of tokens stay under this many bytes (64 MiB: 110 tokens at V = 150k)."""


def _chunk(v: int) -> int:
    return max(1, CHUNK_BYTES // max(1, 4 * v))


class _FusedHeadLogProb(torch.autograd.Function):
    """log softmax((h W^T + b) / temperature)[target] per token and the entropy, chunk by chunk over tokens.

    Neither the logits nor a log-softmax of the whole mini-batch exists at any time: the forward keeps
    the hidden states (already needed) and a logsumexp per token; the backward recomputes each chunk's
    logits, turns them into d logits = g (onehot - softmax), and accumulates the gradients of the hidden
    states and of the head's weight (and bias). Float32 math for any parameter dtype (float64 for float64).
    The entropy is an output without gradient.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        want_entropy: bool,
        temperature: float,
    ):
        n, v = hidden.shape[0], weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        inv_t = 1.0 / temperature
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        ent = torch.empty(n if want_entropy else 0, dtype=acc, device=hidden.device)
        step = _chunk(v)
        for s in range(0, n, step):
            z = torch.nn.functional.linear(hidden[s : s + step], weight, bias).to(acc) * inv_t  # (c, V)
            lse[s : s + step] = torch.logsumexp(z, dim=-1)
            logp[s : s + step] = z.gather(-1, targets[s : s + step, None]).squeeze(-1) - lse[s : s + step]
            if want_entropy:
                prob = torch.exp(z - lse[s : s + step, None])
                ent[s : s + step] = lse[s : s + step] - (prob * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.inv_t = inv_t
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor, _g_ent: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        n, v = hidden.shape[0], weight.shape[0]
        acc, inv_t = lse.dtype, ctx.inv_t
        g_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        g_bias = torch.zeros(v, dtype=acc, device=weight.device) if bias is not None else None
        w = weight.to(acc)
        step = _chunk(v)
        for s in range(0, n, step):
            h = hidden[s : s + step]
            z = torch.nn.functional.linear(h, weight, bias).to(acc) * inv_t
            g = g_logp[s : s + step, None].to(acc)  # (c, 1)
            d = -torch.exp(z - lse[s : s + step, None]) * g  # d logp / d z = onehot - softmax
            d.scatter_add_(-1, targets[s : s + step, None], g)
            d *= inv_t  # z = raw logits / temperature
            if g_hidden is not None:
                g_hidden[s : s + step] = (d @ w).to(hidden.dtype)
            g_weight.addmm_(d.t(), h.to(acc))
            if g_bias is not None:
                g_bias += d.sum(0)
        return (
            g_hidden,
            g_weight.to(weight.dtype),
            None if g_bias is None else g_bias.to(bias.dtype),
            None,
            None,
            None,
        )


_SCALED_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _plain_head(model: PreTrainedModel) -> torch.nn.Linear | None:
    """The model's output layer if logits are exactly ``lm_head(hidden)`` (every supported MoE family); else None."""
    head = getattr(model, "lm_head", None)
    if type(head) is not torch.nn.Linear or any(getattr(model.config, a, None) for a in _SCALED_HEAD):
        return None
    return head


class _HiddenOnly(torch.nn.Module):
    """Stands in for the output layer during a forward: keeps its input, returns no logits."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.hidden = x
        return x.new_zeros(*x.shape[:-1], 1)


def response_log_probs(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    *,
    entropy: bool = True,
    temperature: float = 1.0,
    **forward_kwargs,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Log-prob of each of the last ``response_len`` tokens ``(B, T)`` (float32), their entropy ``(B, T)``
    (no graph) and the model's MoE aux loss if it returned one, under softmax(logits / temperature): the
    distribution the sampler draws from at that temperature (as TRL and verl score rollouts).

    The output layer runs only at the T positions that score the response, chunk by chunk inside
    :class:`_FusedHeadLogProb`: no tensor of size ``(B, T, V)``, let alone ``(B, S, V)``, is ever held,
    in the forward or the backward. (A model whose logits are not a plain ``lm_head`` of the hidden
    states falls back to ``logits_to_keep``: the response positions' logits, once.)
    """
    t = response_len
    b = input_ids.shape[0]
    targets = input_ids[:, -t:]  # (B, T)
    head = _plain_head(model)
    if head is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=t + 1, **forward_kwargs)
        lsm = torch.log_softmax(out.logits[:, :-1].float() / temperature, dim=-1)  # (B, T, V)
        logp = lsm.gather(-1, targets[..., None]).squeeze(-1)
        ent = -(lsm.detach().exp() * lsm.detach()).sum(-1) if entropy else None
        return logp, ent, getattr(out, "aux_loss", None)
    capture = _HiddenOnly()
    model.lm_head = capture
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=t + 1, **forward_kwargs)
    finally:
        model.lm_head = head
    hidden = capture.hidden[:, :-1]  # (B, T, H): position P-1+i scores response token i
    logp, ent = _FusedHeadLogProb.apply(
        hidden.reshape(b * t, -1), head.weight, head.bias, targets.reshape(-1), entropy, float(temperature)
    )
    return logp.float().view(b, t), ent.float().view(b, t) if entropy else None, getattr(out, "aux_loss", None)
