"""Pure low-rank weights, ``W = B A``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsparam.config import LowRankConfig, resolve_rank
from lsparam.methods.base import StructuredParametrization
from lsparam.methods.svd import balanced_factors, svd


class LowRankParametrization(StructuredParametrization):
    """``W = B A`` with ``B`` (out×r), ``A`` (r×in), both initialised from the top-r SVD.

    The forward computes ``(x Aᵀ) Bᵀ``: ``r·(in+out)`` multiply-adds per token instead of ``in·out``.
    """

    method = "lowrank"
    factor_names = ("B", "A")
    factor_roles = ("lowrank_out", "lowrank_in")

    def __init__(self, config: LowRankConfig, out_features: int, in_features: int, layer_name: str = ""):
        self.rank = resolve_rank(config.rank, out_features, in_features, layer=layer_name)
        super().__init__(config, out_features, in_features, layer_name)

    def init_factors(self, weight):
        return balanced_factors(*svd(weight), self.rank)

    def dense(self, B, A):
        return B @ A

    def linear(self, x, B, A):
        return F.linear(F.linear(x, A), B)


def build(config: LowRankConfig, layer: torch.nn.Linear, name: str) -> LowRankParametrization:
    return LowRankParametrization(config, layer.out_features, layer.in_features, name)
