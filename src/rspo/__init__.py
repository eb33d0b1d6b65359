"""rspo: stable RL (GRPO family) for Mixture-of-Experts language models, with Router-Shift Policy Optimization."""

from rspo import objectives, routing
from rspo.objectives import compute_policy_loss, list_objectives

__version__ = "0.1.0"
__all__ = ["__version__", "compute_policy_loss", "list_objectives", "objectives", "routing"]
