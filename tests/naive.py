"""Naive per-token Python-loop reference implementations (float64 scalars), for equivalence tests.

Written independently of rspo.objectives: plain loops over b and t, math module only.
"""

from __future__ import annotations

import math


def _sign(x: float) -> float:
    return (x > 0) - (x < 0)


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _rows(mask):
    return [[t for t in range(len(mask[b])) if mask[b][t] > 0] for b in range(len(mask))]


def grpo(
    lp,
    old,
    adv,
    mask,
    gamma=None,
    *,
    clip_low=0.2,
    clip_high=0.2,
    loss_agg="seq-mean-token-mean",
    norm_length=None,
    placement="after_clip",
    dual_clip=None,
    weights=None,
):
    """``weights``: rollout weights, a list per row (per token) or one number per row (per sequence)."""
    rows = _rows(mask)
    tok = {}
    for b, ts in enumerate(rows):
        for t in ts:
            w = math.exp(lp[b][t] - old[b][t])
            g = 1.0 if gamma is None else gamma[b][t]
            if placement == "before_clip":
                w *= g
            a = adv[b][t]
            val = max(-a * w, -a * _clip(w, 1 - clip_low, 1 + clip_high))
            if dual_clip is not None and a < 0:
                val = min(val, -a * dual_clip)
            if placement == "after_clip":
                val *= g
            if weights is not None:
                val *= weights[b][t] if isinstance(weights[b], list) else weights[b]
            tok[b, t] = val
    if loss_agg == "token-mean":
        return sum(tok.values()) / len(tok)
    seqs = []
    for b, ts in enumerate(rows):
        if not ts:
            continue
        s = sum(tok[b, t] for t in ts)
        seqs.append(s / len(ts) if loss_agg == "seq-mean-token-mean" else s / norm_length)
    return sum(seqs) / len(seqs)


def seq_weight(weights, b, ts, reduce="geometric"):
    """One rollout weight for row b: as given per sequence, or reduced over its tokens."""
    if weights is None:
        return 1.0
    if not isinstance(weights[b], list):
        return weights[b]
    if reduce == "arithmetic":
        return sum(weights[b][t] for t in ts) / len(ts)
    if any(weights[b][t] == 0 for t in ts):
        return 0.0
    return math.exp(sum(math.log(weights[b][t]) for t in ts) / len(ts))


def gspo(
    lp,
    old,
    adv,
    mask,
    gamma=None,
    *,
    clip_low=3e-4,
    clip_high=4e-4,
    placement="after_clip",
    dual_clip=None,
    weights=None,
    reduce="geometric",
):
    out = []
    for b, ts in enumerate(_rows(mask)):
        if not ts:
            continue
        log_s = sum(lp[b][t] - old[b][t] for t in ts) / len(ts)
        log_g = 0.0 if gamma is None else sum(math.log(gamma[b][t]) for t in ts) / len(ts)
        a = sum(adv[b][t] for t in ts) / len(ts)
        s = math.exp(log_s + (log_g if placement == "before_clip" else 0.0))
        val = max(-a * s, -a * _clip(s, 1 - clip_low, 1 + clip_high))
        if dual_clip is not None and a < 0:
            val = min(val, -a * dual_clip)
        if placement == "after_clip":
            val *= math.exp(log_g)
        out.append(val * seq_weight(weights, b, ts, reduce))
    return sum(out) / len(out)


def gmpo(
    lp,
    old,
    adv,
    mask,
    gamma=None,
    *,
    clip_low=0.4,
    clip_high=0.4,
    placement="after_clip",
    form="weight",
    weights=None,
    reduce="geometric",
):
    out = []
    for b, ts in enumerate(_rows(mask)):
        if not ts:
            continue
        total = 0.0
        for t in ts:
            dl = lp[b][t] - old[b][t]
            lg = 0.0 if gamma is None else math.log(gamma[b][t])
            if placement == "before_clip":
                dl += lg
            s = _sign(adv[b][t])
            if s > 0:
                dlc = min(dl, clip_high)  # only the upper bound binds for A > 0
            elif s < 0:
                dlc = max(dl, -clip_low)  # only the lower bound binds for A < 0
            else:
                dlc = 0.0
            if placement == "after_clip":
                dlc += s * lg if form == "eq5_literal" else lg
            total += dlc
        a = sum(adv[b][t] for t in ts) / len(ts)
        out.append(-a * math.exp(total / len(ts)) * seq_weight(weights, b, ts, reduce))
    return sum(out) / len(out)


def router_shift(old, new, *, expert_agg="log_mean", layer_agg="geo_mean", gamma_min=0.5, eps=1e-8):
    """old/new: nested lists [B][T][L][K] of router log-probs."""
    le = math.log(eps)
    res = []
    for b in range(len(old)):
        row = []
        for t in range(len(old[b])):
            logs = []
            for layer in range(len(old[b][t])):
                ds = [abs(max(n, le) - max(o, le)) for o, n in zip(old[b][t][layer], new[b][t][layer], strict=True)]
                if expert_agg == "log_mean":
                    logs.append(-sum(ds) / len(ds))
                else:
                    logs.append(math.log(sum(math.exp(-d) for d in ds) / len(ds)))
            lg = sum(logs) / len(logs) if layer_agg == "geo_mean" else sum(logs)
            row.append(max(math.exp(lg), gamma_min))
        res.append(row)
    return res


def verl_loss_from_dump(rec):
    """Recompute one dumped verl plugin loss call (``RSPO_VERL_DUMP_DIR``) with the loops above, in float64:
    gamma from the old and current router log-probs, the GMPO/RSPO sequence loss over the micro-batch's rows,
    then verl's global normalisation (rows / global_batch_size * dp_size). Returns (gamma, loss, policy_loss)."""
    if rec["objective"] not in ("rspo", "gmpo"):
        raise ValueError(f"verl_loss_from_dump: objective {rec['objective']!r} is not recomputed here")
    if rec["rollout_weights"] is not None:
        raise ValueError("verl_loss_from_dump: rollout weights are not recomputed here")
    mask = rec["mask"].double().tolist()
    gamma = None
    if rec["old_router_logp"] is not None:
        opt = rec["router_shift_options"]
        gamma = router_shift(
            rec["old_router_logp"].double().tolist(),
            rec["cur_router_logp"].double().tolist(),
            expert_agg=opt["expert_agg"],
            layer_agg=opt["layer_agg"],
            gamma_min=opt["gamma_min"],
        )
    hp = rec["hparams"]
    loss = gmpo(
        rec["log_prob"].double().tolist(),
        rec["old_log_probs"].double().tolist(),
        rec["advantages"].double().tolist(),
        mask,
        gamma,
        clip_low=hp["clip_low"],
        clip_high=hp["clip_high"],
        placement=hp.get("router_shift_placement", "after_clip"),
        form=hp.get("router_shift_form", "weight"),
    )
    rows = sum(1 for row in mask if any(m > 0 for m in row))
    info = rec["info"]
    return gamma, loss, loss * rows / info["global_batch_size"] * int(info["dp_size"] or 1)
