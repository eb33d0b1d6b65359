"""Rollout correction: weights for the mismatch between the engine that sampled and the trainer.

At scale the rollout engine (vLLM, SGLang) and the trainer compute different probabilities for the
same tokens (kernels, precision, batch shapes; for MoE models, different experts). The samples come
from pi_rollout, while the PPO ratio is taken against pi_old (the trainer's old pass): decoupled PPO
multiplies each term by the behaviour ratio r = pi_old / pi_rollout, truncated (TIS) or masked
outside a trust band (IcePop, MIS) because r has a heavy tail.

    corr = RolloutCorrection(level="token", mode="truncate", high=2.0)           # TIS
    w, metrics = corr.weights(old_log_probs, rollout_log_probs, response_mask)   # w: (B, T), detached
    loss, m = compute_policy_loss("rspo", logp, old_log_probs, adv, mask, router_shift=gamma,
                                  rollout_weights=w)

Levels (what r is computed over), with d_t = old_logp_t - rollout_logp_t on response tokens:

    token:      r_t = exp(d_t)                        -> weights (B, T)
    sequence:   r_b = exp(sum_t d_t)                  -> weights (B,)   (the product of token ratios)
    geometric:  r_b = exp(mean_t d_t)                 -> weights (B,)   (length-normalised, as GSPO's ratio)

Modes:

    truncate:   w = clamp(r, low, high)               (TIS; a bound of None is open)
    mask:       w = r if low <= r <= high else 0      (IcePop token-level, MIS / TRL '*_mask')

The names follow the peers: TRL's ``vllm_importance_sampling_mode`` ``token_truncate``, ``token_mask``,
``sequence_truncate``, ``sequence_mask`` with ``clip_min``/``clip_max`` are levels token/sequence with
``low``/``high`` (:meth:`RolloutCorrection.from_trl`); verl's ``rollout_is`` token/sequence with its
threshold is truncate; verl's ``rollout_rs`` and OpenRLHF's ``icepop`` are mask. A rollout log-prob of
NaN (a token the engine could not score) gives r = 1 for that token, as TRL does, and is counted.

Where the weights enter each objective (token objectives per token, sequence objectives per
sequence) and how they compose with router shift: :func:`rspo.objectives.compute_policy_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

Tensor = torch.Tensor
Level = Literal["token", "sequence", "geometric"]
Mode = Literal["truncate", "mask"]
TRL_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _bound(name: str, v: float | None) -> None:
    if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 or None, got {v!r}")


@dataclass(frozen=True)
class RolloutCorrection:
    """How rollout-correction weights are computed (see the module docstring)."""

    level: Level = "token"
    mode: Mode = "truncate"
    low: float | None = None
    """Lower bound: truncate clamps r from below; mask zeroes r < low. None = no lower bound."""
    high: float | None = 2.0
    """Upper bound: truncate clamps r from above (TIS's C); mask zeroes r > high. None = none."""

    def __post_init__(self) -> None:
        if self.level not in get_args(Level):
            raise ValueError(f"level={self.level!r}; valid: {', '.join(get_args(Level))}")
        if self.mode not in get_args(Mode):
            raise ValueError(f"mode={self.mode!r}; valid: {', '.join(get_args(Mode))}")
        _bound("low", self.low)
        _bound("high", self.high)
        if self.low is None and self.high is None:
            raise ValueError(f"mode={self.mode!r} needs a bound: set low and/or high (both None changes nothing)")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")

    @classmethod
    def from_trl(cls, mode: str, clip_min: float | None, clip_max: float | None) -> RolloutCorrection:
        """TRL's ``vllm_importance_sampling_mode`` / ``_clip_min`` / ``_clip_max``."""
        if mode not in TRL_MODES:
            raise ValueError(f"vllm_importance_sampling_mode={mode!r}; valid: {', '.join(TRL_MODES)}")
        level, how = mode.split("_")
        return cls(level=level, mode=how, low=clip_min, high=clip_max)  # type: ignore[arg-type]

    def weights(
        self, old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """``(weights, metrics)``: weights ``(B, T)`` (token) or ``(B,)`` (sequence, geometric), detached,
        1 at padding; metrics ``rollout/...`` (see :func:`rollout_weights`)."""
        return rollout_weights(old_log_probs, rollout_log_probs, mask, self)


def _log_ratios(old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Checked inputs -> ``(d, keep, nan)``: ``d = old - rollout`` per token ``(B, T)`` (0 at padding and at
    tokens whose rollout log-prob is NaN), the response mask, and those NaN tokens."""
    for name, t in (("old_log_probs", old_log_probs), ("rollout_log_probs", rollout_log_probs), ("mask", mask)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (B, T), got {getattr(t, 'shape', type(t).__name__)}")
    bt = tuple(old_log_probs.shape)
    for name, t in (("rollout_log_probs", rollout_log_probs), ("mask", mask)):
        if tuple(t.shape) != bt:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {bt} (the shape of old_log_probs)")
        if t.device != old_log_probs.device:
            raise ValueError(f"{name} is on {t.device}, old_log_probs on {old_log_probs.device}")
    keep = mask != 0
    old = old_log_probs.detach()
    roll = rollout_log_probs.detach().to(old.dtype)
    nan = keep & torch.isnan(roll)
    if bool((keep & torch.isnan(old)).any()) or bool((keep & (old == math.inf)).any()):
        raise ValueError("old_log_probs is NaN or +inf on response tokens")
    if bool((keep & ~nan & (roll > 1e-3)).any()):
        worst = roll[keep & ~nan].max().item()
        raise ValueError(f"rollout_log_probs must be log-probabilities (<= 0) on response tokens; max is {worst:.4g}")
    zero = torch.zeros((), dtype=old.dtype, device=old.device)
    return torch.where(keep & ~nan, old - roll, zero), keep, nan


def _ratio_metrics(r: Tensor) -> dict[str, float]:
    n, nan_f = r.numel(), float("nan")
    return {
        "rollout/ratio_min": float(r.min()) if n else nan_f,
        "rollout/ratio_mean": float(r.mean()) if n else nan_f,
        "rollout/ratio_max": float(r.max()) if n else nan_f,
    }


def _token_metrics(d: Tensor, keep: Tensor, nan: Tensor) -> dict[str, float]:
    dt = d[keep & ~nan]
    return {
        "rollout/logp_diff_mean": float(dt.abs().mean()) if dt.numel() else 0.0,
        "rollout/logp_diff_max": float(dt.abs().max()) if dt.numel() else 0.0,
        "rollout/kl_k3": float((torch.expm1(dt) - dt).mean()) if dt.numel() else 0.0,
        "rollout/nan_tokens": float(nan.sum()),
    }


@torch.no_grad()
def mismatch_metrics(old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor) -> dict[str, float]:
    """The mismatch between sampler and trainer without any correction: the token ratio's
    ``rollout/ratio_{min,mean,max}`` and the token metrics of :func:`rollout_weights`."""
    d, keep, nan = _log_ratios(old_log_probs, rollout_log_probs, mask)
    return {**_ratio_metrics(torch.exp(d[keep])), **_token_metrics(d, keep, nan)}


def rollout_weights(
    old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor, corr: RolloutCorrection
) -> tuple[Tensor, dict[str, float]]:
    """Rollout-correction weights and their metrics.

    Args:
        old_log_probs: ``(B, T)`` the trainer's log-probs of the sampled tokens (its old pass).
        rollout_log_probs: ``(B, T)`` the sampler's log-probs of the same tokens, at the same temperature.
        mask: ``(B, T)`` response tokens (nonzero).

    Metrics, over response tokens (token level) or sequences with tokens (sequence levels):
    ``rollout/ratio_{min,mean,max}`` (r before truncation or masking), ``rollout/weight_mean``,
    ``rollout/truncated_frac`` or ``rollout/masked_frac`` (share of tokens or sequences a bound changed),
    over tokens ``rollout/logp_diff_{mean,max}`` (|old - rollout|), ``rollout/kl_k3`` (k3 estimate of
    KL(pi_rollout || pi_old) from the rollout's own samples: mean of r - 1 - log r), and
    ``rollout/nan_tokens`` (response tokens whose rollout log-prob was NaN: r = 1 there).
    """
    d, keep, nan = _log_ratios(old_log_probs, rollout_log_probs, mask)
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    n_tok = keep.sum(-1)  # (B,)
    if corr.level == "token":
        log_r, unit = d, keep
    elif corr.level == "sequence":
        log_r, unit = d.sum(-1), n_tok > 0
    else:
        log_r, unit = d.sum(-1) / n_tok.clamp(min=1), n_tok > 0
    r = torch.exp(log_r)
    lo = -math.inf if corr.low is None else corr.low
    hi = math.inf if corr.high is None else corr.high
    outside = (r < lo) | (r > hi)
    w = torch.clamp(r, min=corr.low, max=corr.high) if corr.mode == "truncate" else torch.where(outside, zero, r)
    w = torch.where(unit, w, torch.ones((), dtype=w.dtype, device=w.device))

    with torch.no_grad():
        n = int(unit.sum())
        metrics = {
            **_ratio_metrics(r[unit]),
            "rollout/weight_mean": float(w[unit].mean()) if n else float("nan"),
            f"rollout/{'truncated' if corr.mode == 'truncate' else 'masked'}_frac": float(outside[unit].double().mean())
            if n
            else 0.0,
            **_token_metrics(d, keep, nan),
        }
    return w, metrics


__all__ = ["TRL_MODES", "Level", "Mode", "RolloutCorrection", "mismatch_metrics", "rollout_weights"]
