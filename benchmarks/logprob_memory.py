"""Peak memory of the response log-probs (forward + backward) at a real vocabulary size, side by side.

Three ways to get log p(response token) and its gradient from one mini-batch, each measured in a fresh
subprocess as the rise of its peak resident memory (Linux VmHWM, reset before the step):

- rspo:    ``rspo.logprobs.response_log_probs``: the output layer fused into a chunked log-prob op (no
           (B, T, V) tensor in forward or backward; entropy from the same chunks, no graph)
- keep:    ``logits_to_keep`` (logits at the response positions only) + log_softmax + gather
- naive:   full-sequence logits + log_softmax + gather (what a straightforward trainer does)

Reported relative to the size of one mini-batch of float32 response logits, B x T x V x 4 bytes
(the budget the issue names: nothing beyond the logits of one mini-batch).

    python benchmarks/logprob_memory.py [--vocab 150000 --batch 8 --prompt 64 --response 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch

CHILD = r"""
import json, sys, torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from rspo.logprobs import response_log_probs
mode, v, b, p, t = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(2)
torch.manual_seed(0)
model = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=v, hidden_size=64, intermediate_size=128,
    moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts=8, num_experts_per_tok=2, tie_word_embeddings=True, max_position_embeddings=p + t + 8))
ids = torch.randint(0, v, (b, p + t)); am = torch.ones_like(ids)
def rss(field):
    return int(next(x for x in open("/proc/self/status") if x.startswith(field)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current size
base = rss("VmRSS")
if mode == "rspo":
    logp, ent, _ = response_log_probs(model, ids, am, t)
elif mode == "keep":
    logits = model(input_ids=ids, attention_mask=am, logits_to_keep=t + 1).logits[:, :-1]
    lsm = torch.log_softmax(logits, -1)
    logp = lsm.gather(-1, ids[:, -t:, None]).squeeze(-1)
    with torch.no_grad():
        ent = -(lsm.exp() * lsm).sum(-1)
    del logits, lsm
else:
    logits = model(input_ids=ids, attention_mask=am).logits[:, -t - 1 : -1]
    lsm = torch.log_softmax(logits, -1)
    logp = lsm.gather(-1, ids[:, -t:, None]).squeeze(-1)
    with torch.no_grad():
        ent = -(lsm.exp() * lsm).sum(-1)
    del logits, lsm
logp.sum().backward()
print(json.dumps({"peak": rss("VmHWM") - base, "logp": float(logp.sum()), "ent": float(ent.mean())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=256)
    a = ap.parse_args()
    logits_mb = a.batch * a.response * a.vocab * 4 / 2**20
    print(
        f"# {platform.node()} {platform.machine()}, torch {torch.__version__}; V={a.vocab:,} B={a.batch} "
        f"P={a.prompt} T={a.response}; one mini-batch of float32 response logits = {logits_mb:,.0f} MiB"
    )
    results = {}
    for mode in ("rspo", "keep", "naive"):
        r = subprocess.run(
            [sys.executable, "-c", CHILD, mode, str(a.vocab), str(a.batch), str(a.prompt), str(a.response)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        peak = results[mode]["peak"] / 2**20
        print(f"{mode:6s} peak rise {peak:8,.0f} MiB = {peak / logits_mb:5.2f} x the mini-batch logits")
    same = abs(results["rspo"]["logp"] - results["naive"]["logp"]) <= 1e-3 * abs(results["naive"]["logp"])
    print(f"same log-probs (sum {results['rspo']['logp']:.4f} vs {results['naive']['logp']:.4f}): {same}")
    print(
        f"ratios: rspo / keep = {results['rspo']['peak'] / results['keep']['peak']:.3f}, "
        f"rspo / naive = {results['rspo']['peak'] / results['naive']['peak']:.3f}"
    )


if __name__ == "__main__":
    main()
