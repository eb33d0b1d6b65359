"""The ``rspo`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from rspo import objectives, routing


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


def cmd_objectives(args: argparse.Namespace) -> int:
    if args.list:
        for name in objectives.list_objectives():
            o = objectives.get_objective(name)
            print(f"{name:11s} router_shift={o.router_shift:8s} defaults={dict(o.defaults)}")
            print(f"{'':11s} {o.summary}\n{'':11s} paper: {o.paper}")
        return 0
    lp, old_lp, adv, mask, gamma, nsr = toy_batch(args.seed)
    print(
        f"toy batch: B={lp.shape[0]} T={lp.shape[1]}, {int(mask.sum())} response tokens, "
        f"advantages {adv.tolist()}, gamma mean {gamma[mask > 0].mean():.3f}, non-shifted ratio {nsr:.2f}\n"
    )
    cols = [
        "loss/policy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "ratio/std",
        "kl/approx",
        "router/gamma_mean",
    ]
    print(f"{'objective':13s} {'router shift':13s} " + " ".join(f"{c:>20s}" for c in cols))
    for name in objectives.list_objectives():
        use = objectives.get_objective(name).router_shift
        variants: list[tuple[str, dict]] = [] if use == "required" else [("-", {})]
        if use != "none":
            variants += [(p, {"router_shift_placement": p}) for p in ("after_clip", "before_clip")]
        for label, hp in variants:
            rs = gamma if hp else None
            _, m = objectives.compute_policy_loss(name, lp, old_lp, adv, mask, router_shift=rs, **hp)
            cells = " ".join(f"{m[c]:>20.6f}" if c in m else f"{'':>20s}" for c in cols)
            print(f"{name:13s} {label:13s} {cells}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rspo.models import PRESETS, build_model, count_parameters
    from rspo.routing import MoERouters

    print(
        f"{'preset':26s} {'family':12s} {'total':>10s} {'active':>10s} {'MoE layers':>10s} {'E':>3s} {'k':>2s}  "
        f"{'trace B/token':>13s}  description"
    )
    for name, p in PRESETS.items():
        model = build_model(name, args.vocab_size)
        total, active = count_parameters(model)
        r = MoERouters(model)
        print(
            f"{name:26s} {p.family:12s} {total:>10,d} {active:>10,d} {r.num_layers:>10d} {r.num_experts:>3d} "
            f"{r.top_k:>2d}  {r.bytes_per_token():>13d}  {p.description}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rspo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    po = sub.add_parser("objectives", help="compute every objective on a toy batch and print a table")
    po.add_argument("--list", action="store_true", help="list registered objectives, defaults and papers")
    po.add_argument("--seed", type=int, default=0)
    po.set_defaults(func=cmd_objectives)
    pm = sub.add_parser("models", help="list the model presets with total and active parameter counts")
    pm.add_argument("--vocab-size", type=int, default=32, help="vocabulary size to count parameters with")
    pm.set_defaults(func=cmd_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
