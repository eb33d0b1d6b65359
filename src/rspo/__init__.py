"""rspo: stable RL (GRPO family) for Mixture-of-Experts language models, with Router-Shift Policy Optimization.

Submodules import on first use (``rspo.objectives``, ``rspo.routing``, ...), so light processes such as
the reward-scoring workers do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "compute_policy_loss", "list_objectives", "objectives", "options", "routing"]


def __getattr__(name: str) -> Any:
    if name in ("objectives", "options", "routing"):
        return importlib.import_module(f"rspo.{name}")
    if name in ("compute_policy_loss", "list_objectives"):
        return getattr(importlib.import_module("rspo.objectives"), name)
    raise AttributeError(f"module 'rspo' has no attribute {name!r}")
