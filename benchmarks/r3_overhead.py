"""The step-time cost of rollout routing replay (R3) in our trainer, measured side by side in one run.

Both arms: RSPO on the main testbed (builtin:countdown-e64k8, 64 experts, top-8), bfloat16 rollouts from a
float32 trainer, 16 prompts x 8 responses, 4 updates per rollout batch, the same prompts and sampling seeds per
step, a learning rate small enough that the two stay alike. One arm replays the rollout's experts (recording
them during generation, replaying them in the old pass and every update), the other does not; the per-step
diagnostics forward is off in both. Steps alternate; medians per phase and the whole-step ratio are printed
(target: at most 3% on the step), per step and per token (the arms' response lengths drift apart), with the
routed experts' bytes per token.

    python benchmarks/r3_overhead.py [--steps 8]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rspo.config import build
from rspo.train_config import TrainConfig
from rspo.trainer import Trainer


def make(name: str, r3: bool, work: Path) -> Trainer:
    data = {
        "model": "base",
        "out_dir": str(work / name),
        "steps": 10**6,
        "eval_every": 0,
        "checkpoint_every": 10**6,
        "mini_batch_size": 32,
        "objective": {"name": "rspo"},
        "optim": {"lr": 1e-6},
        "rollout": {"prompts_per_step": 16, "dtype": "bfloat16", "record_routing": r3, "routing_diagnostics": False},
        "routing": {"control": "replay_rollout" if r3 else "none"},
    }
    return Trainer(build(TrainConfig, data), progress=False)


def one_step(tr: Trainer, step: int) -> tuple[dict[str, float], int, int]:
    tr.state.step = step  # the same prompts and sampling seed in both arms
    t = [time.perf_counter()]
    b = tr.rollout()
    t.append(time.perf_counter())
    tr.score_and_advantages(b)
    tr.old_pass(b)
    t.append(time.perf_counter())
    tr.update(b)
    t.append(time.perf_counter())
    phases = {"generate": t[1] - t[0], "score_old_pass": t[2] - t[1], "update": t[3] - t[2], "step": t[3] - t[0]}
    phases["tokens"] = float(b.attention_mask.sum())  # prompt + response: the two arms' lengths may drift apart
    nbytes = 0 if b.routed_experts is None else b.routed_experts.numel() * b.routed_experts.element_size()
    return phases, nbytes, int(b.attention_mask.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp())
    plain, r3 = make("plain", False, work), make("r3", True, work)
    print(
        f"# {platform.machine()}, torch {torch.__version__}, threads 2; {args.steps} alternating steps after a warm-up"
    )
    one_step(plain, 0), one_step(r3, 0)
    res: dict[str, list[dict[str, float]]] = {"plain": [], "r3": []}
    size = (0, 1)
    for s in range(1, args.steps + 1):
        res["plain"].append(one_step(plain, s)[0])
        phases, nbytes, ntok = one_step(r3, s)
        res["r3"].append(phases)
        size = (nbytes, ntok)
    for ph in ("generate", "score_old_pass", "update", "step"):
        a = statistics.median(r[ph] for r in res["plain"])
        b = statistics.median(r[ph] for r in res["r3"])
        # per token as well: both arms start from the same prompts and seeds, but their responses' lengths differ
        pa = statistics.median(r[ph] / r["tokens"] for r in res["plain"])
        pb = statistics.median(r[ph] / r["tokens"] for r in res["r3"])
        print(
            f"{ph:15s} without R3 {a * 1e3:8.1f} ms   with R3 {b * 1e3:8.1f} ms   ratio {b / a:.3f}"
            f"   per token: {pa * 1e6:7.1f} / {pb * 1e6:7.1f} us, ratio {pb / pa:.3f}"
        )
    for arm in ("plain", "r3"):
        print(f"tokens per step ({arm}): median {statistics.median(r['tokens'] for r in res[arm]):.0f}")
    print(f"routed experts: {size[0]} bytes for {size[1]} tokens ({size[0] / size[1]:.1f} B/token: L x k one-byte ids)")


if __name__ == "__main__":
    main()
