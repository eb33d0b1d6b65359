"""The step time of RSPO vs GRPO inside verl's own trainer (``python -m verl.trainer.main_ppo``, v1 trainer,
FSDP2, one gloo rank on CPU through tests/verl_e2e's shim), measured side by side in one run, and the router
trace's bytes per token in verl's batch.

Both arms run recipe.py's CPU command (the Countdown testbed model: 64 experts, top-8, 4 layers; 8 prompts x
4 responses per step, two mini-batches); GRPO is plain verl (no plugin section), RSPO adds the plugin. Runs
alternate (GRPO, RSPO, GRPO, RSPO, ...); the first step of each run (start-up) is left out; medians per phase
over the remaining steps and the RSPO/GRPO ratios are printed. The phases the plugin touches are the
old-log-prob pass (the capture) and the update (the gather and the loss); generation is the HF rollout's.

    .venv-verl/bin/python benchmarks/verl_step_time.py [--rounds 2] [--steps 4]      (make test-verl-e2e's venv)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.verl_e2e import recipe  # noqa: E402

PHASES = ("timing_s/step", "timing_s/gen", "timing_s/old_log_prob", "timing_s/update_actor")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="GRPO/RSPO pairs of runs")
    ap.add_argument("--steps", type=int, default=4, help="training steps per run (the first is left out)")
    args = ap.parse_args()
    work = recipe.prepare(Path(tempfile.mkdtemp(prefix="verl-bench-")), python=sys.executable)
    times: dict[str, dict[str, list[float]]] = {arm: {p: [] for p in PHASES} for arm in ("grpo", "rspo")}
    trace = None
    for r in range(args.rounds):
        for arm in ("grpo", "rspo"):
            name = f"{arm}-{r}"
            cmd = recipe.cpu_command(
                str(work / "data"),
                str(work / "model"),
                str(work / f"ckpt-{name}"),
                objective=None if arm == "grpo" else "rspo",
                steps=args.steps,
                python=sys.executable,
            )
            run = recipe.run(cmd, work, name, dump=arm == "rspo" and trace is None)
            if run.returncode != 0 or sorted(run.metrics) != list(range(1, args.steps + 1)):
                raise SystemExit(f"{name}: main_ppo exited {run.returncode}, steps {sorted(run.metrics)}\n{run.tail()}")
            for step, m in run.metrics.items():
                if step > 1:
                    for p in PHASES:
                        times[arm][p].append(m[p])
            if run.dumps:
                d = run.dumps[0]
                idx, logp = d["old_router_idx"], d["old_router_logp"]  # (B, T, L, K) as verl's batch carried them
                trace = (idx.shape[-2:], idx.element_size(), logp.element_size())
            step = statistics.median(m["timing_s/step"] for s, m in run.metrics.items() if s > 1)
            print(f"{name}: {run.seconds:.0f} s, step {step:.2f} s")
    print(
        f"\nverl 0.9.1 main_ppo on CPU ({platform.processor() or platform.machine()}, {args.rounds} rounds x "
        f"{args.steps - 1} steps per arm; medians, seconds)"
    )
    print(f"{'phase':<24}{'GRPO':>9}{'RSPO':>9}{'RSPO/GRPO':>11}")
    for p in PHASES:
        g, s = statistics.median(times["grpo"][p]), statistics.median(times["rspo"][p])
        print(f"{p:<24}{g:>9.3f}{s:>9.3f}{s / g:>11.3f}")
    if trace is not None:
        (layers, k), ib, fb = trace
        per_token = layers * k * (ib + fb)
        print(
            f"\nrouter trace in verl's batch: {layers} MoE layers x top-{k} x ({ib} B index + {fb} B log-prob) = "
            f"{per_token} B per token (every position, prompt included); Qwen3-30B-A3B (48 x 8): {48 * 8 * (ib + fb)} B"
        )


if __name__ == "__main__":
    main()
