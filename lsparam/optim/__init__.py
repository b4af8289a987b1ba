"""Memory-lean optimization: per-layer updates in backward and low-bit states (torchao)."""

from lsparam.optim.lean import LeanOptimizer, param_groups_by_role

__all__ = ["LeanOptimizer", "param_groups_by_role"]
