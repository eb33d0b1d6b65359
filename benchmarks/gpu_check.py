"""The GPU check (``make gpu-check``): one script for a lent accelerator, with only torch and transformers there.

Each check runs on its own and records pass/fail with its numbers; one failing does not stop the others. All
results go to one JSON file:

1. the device: torch, transformers, the GPU and its memory;
2. the fused response log-prob kernel against a plain log-softmax on the device (float32, max abs diff);
3. a float32 trainer step on the device: every tensor there, the first mini-batch exactly on-policy (ratio
   and gamma exactly 1), the parameters move;
4. a bfloat16 trainer step: finite loss, parameters move;
5. rollout routing replay (R3) on the device: a float32 rollout routes exactly as the trainer (no token
   disagrees), a bfloat16 rollout's disagreement and log-prob mismatch with and without replay;
6. step time (generate, old pass, update) and peak memory of GRPO, RSPO and RSPO+R3 (bf16 rollouts) on the
   ``qwen3-moe-100m`` preset (about 110M parameters), medians over the steps after a warm-up step.

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu-check.json        # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --smoke --out /tmp/g.json      # the same code, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rspo.config import build
from rspo.lab.presets import build_model
from rspo.lab.tokenizer import build_char_tokenizer
from rspo.rundir import read_metrics
from rspo.train_config import TrainConfig
from rspo.trainer import Trainer


def make_model(preset: str, out: Path) -> str:
    tok = build_char_tokenizer()
    model = build_model(preset, len(tok), seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def train_config(model: str, out: Path, device: str, sizes: dict[str, int], **over: Any) -> TrainConfig:
    data = {
        "model": model,
        "out_dir": str(out),
        "device": device,
        "eval_every": 0,
        "checkpoint_every": 1000,
        "steps": sizes["steps"],
        "mini_batch_size": sizes["mini_batch"],
        "rollout": {"prompts_per_step": sizes["prompts"], "group_size": 8, "max_new_tokens": sizes["tokens"]},
        "optim": {"lr": 1e-3},
    }
    for k, v in over.items():
        node = data
        parts = k.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return build(TrainConfig, data)


def check_kernel(device: str, sizes: dict) -> dict:
    from rspo.logprobs import _FusedHeadLogProb

    g = torch.Generator().manual_seed(0)
    n, h, v = 512, 256, 32000
    hidden = torch.randn(n, h, generator=g).to(device)
    weight = (torch.randn(v, h, generator=g) * 0.05).to(device)
    tgt = torch.randint(0, v, (n,), generator=g).to(device)
    logp, _ = _FusedHeadLogProb.apply(hidden, weight, None, tgt, False, 1.0)
    ref = torch.log_softmax(hidden @ weight.T, -1).gather(-1, tgt[:, None]).squeeze(-1)
    diff = float((logp - ref).abs().max())
    return {"ok": diff < 1e-4, "max_abs_diff": diff}


def check_step(model: str, work: Path, device: str, sizes: dict, dtype: str) -> dict:
    cfg = train_config(
        model, work / f"step-{dtype}", device, {**sizes, "steps": 1}, dtype=dtype, objective__name="rspo"
    )
    tr = Trainer(cfg, progress=False)
    before = [p.detach().clone() for p in tr.model.parameters()]
    on_device = all(p.device.type == torch.device(device).type for p in tr.model.parameters())
    b = tr.rollout()
    tr.score_and_advantages(b)
    g = torch.Generator().manual_seed(0)  # a random model's rewards are all equal: advantages that move it
    b.advantages = torch.randn(b.advantages.shape, generator=g).to(b.advantages)
    tr.old_pass(b)
    first = b.order[: cfg.mini_batch_size]
    loss, m = tr.policy_loss(b, first)
    tr.routing.end()
    exact = m["ratio/max"] == 1.0 and m["ratio/min"] == 1.0 and m["router/gamma_min"] == 1.0
    stats = tr.update(b)
    moved = any(not torch.equal(a, p.detach()) for a, p in zip(before, tr.model.parameters(), strict=True))
    tr.scorer.close()
    tr.run.close()
    finite = bool(torch.isfinite(loss))
    return {
        "ok": on_device and finite and moved and (exact or dtype != "float32"),
        "on_device": on_device,
        "first_minibatch_exactly_on_policy": exact,
        "finite_loss": finite,
        "parameters_moved": moved,
        "gamma_off_policy": stats.get("offpolicy/router_gamma_mean"),
    }


def check_r3(model: str, work: Path, device: str, sizes: dict) -> dict:
    out = {}
    for name, dtype in (("float32", "float32"), ("bfloat16", "bfloat16")):
        cfg = train_config(
            model,
            work / f"r3-{name}",
            device,
            {**sizes, "steps": 1},
            routing__control="replay_rollout",
            rollout__dtype=dtype,
            objective__name="rspo",
        )
        Trainer(cfg, progress=False).train()
        row = read_metrics(cfg.out_dir)[-1]
        out[name] = {k: row[k] for k in row if k.startswith(("rollout/", "router/gamma_mean"))}
    ok = out["float32"]["rollout/routing_disagree_tokens"] == 0.0
    return {"ok": ok, **out}


def check_timing(model: str, work: Path, device: str, sizes: dict) -> dict:
    arms = {
        "grpo": {"objective__name": "grpo", "log_router": False},
        "rspo": {"objective__name": "rspo"},
        "rspo_r3": {"objective__name": "rspo", "routing__control": "replay_rollout", "rollout__dtype": "bfloat16"},
    }
    out = {}
    for arm, over in arms.items():
        cfg = train_config(model, work / f"time-{arm}", device, sizes, **over)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        Trainer(cfg, progress=False).train()
        rows = read_metrics(cfg.out_dir)[1:]  # the first step warms up
        out[arm] = {k: statistics.median(r[f"time/{k}"] for r in rows) for k in ("generate", "old_pass", "update")}
        out[arm]["seconds"] = time.time() - t0
        if device == "cuda":
            out[arm]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for arm in ("rspo", "rspo_r3"):
        g, r = out["grpo"], out[arm]
        out[f"{arm}_over_grpo_old_pass_plus_update"] = (r["old_pass"] + r["update"]) / (g["old_pass"] + g["update"])
    return {"ok": True, **out}


def run(name: str, fn: Callable[[], dict], results: dict) -> None:
    t0 = time.time()
    try:
        results[name] = fn()
    except Exception as e:  # a failed check is recorded, the next one runs
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    results[name]["check_seconds"] = round(time.time() - t0, 1)
    print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['check_seconds']} s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-check.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and model (runs on a CPU in seconds)")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --smoke to run the same code on a CPU", file=sys.stderr)
        return 2
    sizes = (
        {"prompts": 4, "tokens": 8, "mini_batch": 16, "steps": 2}
        if a.smoke
        else {"prompts": 32, "tokens": 64, "mini_batch": 64, "steps": 4}
    )
    import transformers

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.node(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor() or "cpu",
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if a.device == "cuda" else None,
        "sizes": sizes,
    }
    work = Path(tempfile.mkdtemp())
    big = make_model("tiny-qwen3-moe" if a.smoke else "qwen3-moe-100m", work / "model")
    run("kernel", lambda: check_kernel(a.device, sizes), results)
    run("float32_step", lambda: check_step(big, work, a.device, sizes, "float32"), results)
    run("bfloat16_step", lambda: check_step(big, work, a.device, sizes, "bfloat16"), results)
    run("r3", lambda: check_r3(big, work, a.device, sizes), results)
    run("timing", lambda: check_timing(big, work, a.device, sizes), results)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out}")
    return 0 if all(v.get("ok") for v in results.values() if isinstance(v, dict) and "ok" in v) else 1


if __name__ == "__main__":
    raise SystemExit(main())
