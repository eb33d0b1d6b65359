"""Step time of RSPO against plain GRPO in our trainer, and the router-trace memory, in one run.

GRPO runs without router capture (log_router=false: what it costs without RSPO); RSPO captures
the old router trace in the old pass and gathers the current router in the update forward.
Both: the base policy, 16 prompts x 8 responses, 32 new tokens, two updates per rollout batch.
Steps alternate GRPO, RSPO, GRPO, RSPO ... with the same prompts and sampling seeds per step;
the ratio of median step times is reported (target <= 1.05), and per phase.

    python benchmarks/rspo_vs_grpo_step.py [--steps 8]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rspo.assets import policy_dir
from rspo.config import build
from rspo.train_config import TrainConfig
from rspo.trainer import Trainer


def make(name: str, model: str, work: Path) -> Trainer:
    cfg = build(
        TrainConfig,
        {
            "model": model,
            "out_dir": str(work / name),
            "steps": 10**6,
            "eval_every": 0,
            "checkpoint_every": 10**6,
            "log_router": False,
            "objective": {"name": name},
            "optim": {"lr": 1e-5},
        },
    )
    return Trainer(cfg, progress=False)


def one_step(tr: Trainer, step: int) -> tuple[dict[str, float], int, int]:
    tr.state.step = step  # same prompts and sampling seed for both trainers at this step
    t = [time.perf_counter()]
    b = tr.rollout()
    t.append(time.perf_counter())
    tr.score_and_advantages(b)
    t.append(time.perf_counter())
    tr.old_pass(b)
    t.append(time.perf_counter())
    tr.update(b)
    t.append(time.perf_counter())
    phases = dict(
        zip(("generate", "score", "old_pass", "update"), (b - a for a, b in itertools.pairwise(t)), strict=True)
    )
    phases["step"] = t[-1] - t[0]
    nbytes = 0 if b.old is None else b.old.trace.nbytes
    return phases, nbytes, int(b.response_mask.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model", default=str(policy_dir("countdown-base")))
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp())
    grpo, rspo = make("grpo", args.model, work), make("rspo", args.model, work)
    print(
        f"# {platform.node()} {platform.machine()}, torch {torch.__version__}, threads 2; 128 responses, "
        f"2 updates/step, {args.steps} steps each after one warm-up"
    )
    one_step(grpo, 0), one_step(rspo, 0)
    res: dict[str, list[dict[str, float]]] = {"grpo": [], "rspo": []}
    mem = []
    for s in range(1, args.steps + 1):
        res["grpo"].append(one_step(grpo, s)[0])
        phases, nbytes, ntok = one_step(rspo, s)
        res["rspo"].append(phases)
        mem.append((nbytes, ntok))
    for ph in ("generate", "old_pass", "update", "step"):
        g = statistics.median(r[ph] for r in res["grpo"])
        r = statistics.median(x[ph] for x in res["rspo"])
        print(f"{ph:9s} GRPO {g * 1e3:8.1f} ms   RSPO {r * 1e3:8.1f} ms   ratio {r / g:.3f}")
    update_ratio = statistics.median(x["old_pass"] + x["update"] for x in res["rspo"]) / statistics.median(
        x["old_pass"] + x["update"] for x in res["grpo"]
    )
    print(f"old pass + update (the part RSPO changes): ratio {update_ratio:.3f}")
    nbytes, ntok = mem[-1]
    print(
        f"router trace of one rollout batch: {nbytes} bytes for {ntok} response tokens "
        f"({nbytes / ntok:.1f} B/token; the policy's weights: "
        f"{sum(p.numel() * 4 for p in rspo.model.parameters()) / 2**20:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
