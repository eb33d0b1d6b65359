"""The prepared GPU check (``make gpu-check``) runs its whole code path on a CPU at tiny sizes, so it does not
rot while no GPU is lent; on a GPU it is the same script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "g.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert all(res[k]["ok"] for k in ("kernel", "float32_step", "bfloat16_step", "r3", "timing"))
    assert (
        res["float32_step"]["first_minibatch_exactly_on_policy"]
        and res["r3"]["float32"]["rollout/routing_disagree_tokens"] == 0
    )
    for arm in ("grpo", "rspo", "rspo_r3"):
        assert res["timing"][arm]["update"] > 0
