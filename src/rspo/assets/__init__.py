"""The policies shipped with rspo, by name: ``model: builtin:NAME`` in configs, ``model: base`` for the main one.

Each is a ``save_pretrained`` directory next to this file (float16 weights, loaded as float32) with the
``pretrain.json`` of its pretraining (``rspo pretrain``) and its own measured test accuracy.
"""

from __future__ import annotations

from pathlib import Path

from rspo.errors import ModelError

DIR = Path(__file__).parent
POLICIES = {
    "countdown-e64k8": "Countdown, Qwen3-MoE 64 experts top-8, 3.38M parameters: the main testbed (model: base)",
    "countdown-base": "Countdown, Qwen3-MoE 8 experts top-1: the first testbed (configs/testbed-e8k1.yaml)",
    "math-tiny-base": "boxed arithmetic, BPE tokenizer with a chat template: the math example (configs/math-tiny.yaml)",
}
"""Shipped policy name -> what it is."""
BASE = "countdown-e64k8"
"""What ``model: base`` names."""
PREFIX = "builtin:"


def policy_dir(name: str) -> Path:
    """The directory of shipped policy ``name`` (an unknown name is an error listing the shipped ones)."""
    if name not in POLICIES:
        raise ModelError(f"model='{PREFIX}{name}': no such shipped policy; shipped: {', '.join(POLICIES)}")
    return DIR / name


def resolve_model(model: str) -> str:
    """``base`` -> the main shipped policy; ``builtin:NAME`` -> shipped policy NAME; anything else unchanged
    (a checkpoint directory or a hub id)."""
    if model == "base":
        return str(policy_dir(BASE))
    if model.startswith(PREFIX):
        return str(policy_dir(model[len(PREFIX) :]))
    return model
