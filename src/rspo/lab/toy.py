"""``rspo objectives``: every objective on a small reproducible off-policy batch, as a table."""

from __future__ import annotations

import torch

from rspo import objectives, routing
from rspo.routing.shift import gamma_metrics


def toy_batch(seed: int = 0, batch: int = 4, length: int = 6, layers: int = 4, experts: int = 8, top_k: int = 2):
    """A small reproducible off-policy batch: log-probs, advantages, mask and a real router shift.

    The router shift comes from two softmax routers (old, and old + noise) over ``experts``
    experts: gamma is computed from the old top-``top_k`` experts exactly as in training.
    """
    g = torch.Generator().manual_seed(seed)
    old_lp = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    lp = old_lp + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)[:batch]
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float64)
    old_logits = torch.randn(batch, length, layers, experts, generator=g, dtype=torch.float64)
    new_logits = old_logits + 0.5 * torch.randn(old_logits.shape, generator=g, dtype=torch.float64)
    old_lsm, new_lsm = old_logits.log_softmax(-1), new_logits.log_softmax(-1)
    idx = old_lsm.topk(top_k, dim=-1).indices
    gamma = routing.router_shift_ratio(old_lsm.gather(-1, idx), new_lsm.gather(-1, idx), gamma_min=0.5)
    nsr = routing.non_shifted_ratio(idx, new_lsm.topk(top_k, dim=-1).indices, mask)
    return lp, old_lp, adv, mask, gamma, nsr


def objectives_listing() -> str:
    """Every registered objective with its router-shift use, defaults and paper."""
    lines = []
    for name in objectives.list_objectives():
        o = objectives.get_objective(name)
        lines.append(f"{name:11s} router_shift={o.router_shift:8s} defaults={dict(o.defaults)}")
        lines.append(f"{'':11s} {o.summary}\n{'':11s} paper: {o.paper}")
    return "\n".join(lines)


def objectives_table(seed: int = 0) -> str:
    """Every objective (and router-shift placement) on :func:`toy_batch`: loss, clip fractions, ratio std, KL."""
    lp, old_lp, adv, mask, gamma, nsr = toy_batch(seed)
    g = gamma_metrics(gamma, mask)
    lines = [
        f"toy batch: B={lp.shape[0]} T={lp.shape[1]}, {int(mask.sum())} response tokens, advantages {adv.tolist()}, "
        f"gamma mean {g['router/gamma_mean']:.3f} (p10 {g['router/gamma_p10']:.3f}), non-shifted ratio {nsr:.2f}\n"
    ]
    cols = ["loss/policy", "clip_ratio/low_mean", "clip_ratio/high_mean", "ratio/std", "kl/approx"]
    lines.append(f"{'objective':13s} {'router shift':13s} " + " ".join(f"{c:>20s}" for c in cols))
    for name in objectives.list_objectives():
        use = objectives.get_objective(name).router_shift
        variants: list[tuple[str, dict]] = [] if use == "required" else [("-", {})]
        if use != "none":
            variants += [(p, {"router_shift_placement": p}) for p in ("after_clip", "before_clip")]
        for label, hp in variants:
            rs = gamma if hp else None
            _, m = objectives.compute_policy_loss(name, lp, old_lp, adv, mask, router_shift=rs, **hp)
            cells = " ".join(f"{m[c]:>20.6f}" if c in m else f"{'':>20s}" for c in cols)
            lines.append(f"{name:13s} {label:13s} {cells}")
    return "\n".join(lines)
