"""Router-capture overhead and trace memory, measured side by side in one run.

Prints, for the main testbed preset at batch B and length S (response = the last T positions):
  - old pass (no-grad forward): time with router capture / without
  - training step (forward + backward): time with the current-router gather / without
  - trace bytes per response token, measured on the captured tensors, and the same for a model
    with Qwen3-30B-A3B's router shape (48 MoE layers, 128 experts, top-8; tiny hidden size).
Timings alternate A, B, A, B ... and report medians and the median of per-pair ratios.

    python benchmarks/router_capture.py [--batch 64 --seq 64 --resp 40 --reps 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from rspo.lab.presets import build_model
from rspo.routing import MoERouters


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(fn_a, fn_b, reps: int) -> tuple[float, float, float]:
    fn_a(), fn_b()  # warm-up
    a, b = [], []
    for _ in range(reps):
        a.append(timed(fn_a))
        b.append(timed(fn_b))
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--resp", type=int, default=40)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--preset", default="qwen3-moe-countdown")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_model(args.preset, vocab_size=32)
    routers = MoERouters(model)
    x = torch.randint(3, 32, (args.batch, args.seq))
    resp = slice(args.seq - args.resp - 1, args.seq - 1)
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; preset {args.preset}, B={args.batch} S={args.seq} T={args.resp}"
    )

    def old_plain():
        with torch.no_grad():
            model(x)

    def old_capture():
        with torch.no_grad(), routers.capture(positions=resp):
            model(x)

    with torch.no_grad(), routers.capture(positions=resp) as rec:
        model(x)
    trace = rec.trace

    def train_plain():
        model.zero_grad(set_to_none=True)
        model(x).logits[:, resp].logsumexp(-1).mean().backward()

    def train_gather():
        model.zero_grad(set_to_none=True)
        with routers.gather(trace, positions=resp):
            out = model(x)
        out.logits[:, resp].logsumexp(-1).mean().backward()

    model.eval()
    a, b, r = paired(old_capture, old_plain, args.reps)
    print(f"old pass       : with capture {a * 1e3:8.1f} ms, without {b * 1e3:8.1f} ms, ratio {r:.3f}")
    model.train()
    a, b, r = paired(train_gather, train_plain, args.reps)
    print(f"training step  : with gather  {a * 1e3:8.1f} ms, without {b * 1e3:8.1f} ms, ratio {r:.3f}")

    n_tok = args.batch * args.resp
    print(
        f"trace bytes/token ({args.preset}, L={routers.num_layers}, K={routers.top_k}): measured "
        f"{trace.nbytes / n_tok:.0f}, formula L*K*5 = {routers.bytes_per_token()}"
    )

    big = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=16,
            moe_intermediate_size=4,
            num_hidden_layers=48,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            num_experts=128,
            num_experts_per_tok=8,
        )
    )
    big_routers = MoERouters(big)
    with torch.no_grad(), big_routers.capture(positions=slice(3, 19)) as big_rec:
        big(torch.randint(0, 32, (2, 20)))
    per = big_rec.trace.nbytes / (2 * 16)
    print(
        f"trace bytes/token (Qwen3-30B-A3B router shape, L=48, K=8, E=128): measured {per:.0f}; "
        f"8k-token responses x 128 sequences: {per * 8192 * 128 / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    main()
