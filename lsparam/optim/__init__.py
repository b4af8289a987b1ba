"""Memory-lean optimization: per-layer updates in backward and low-bit states (torchao)."""

from lsparam.optim.groups import param_groups_by_role
from lsparam.optim.lean import LeanOptimizer

__all__ = ["LeanOptimizer", "param_groups_by_role"]
