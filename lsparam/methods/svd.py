"""Truncated SVD shared by the methods that initialise from a dense weight."""

from __future__ import annotations

import torch


def svd(weight: torch.Tensor):
    """``U, S, Vh`` of ``weight`` (thin), computed in float32 or better (float64 stays float64)."""
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return torch.linalg.svd(weight.detach().to(work_dtype), full_matrices=False)


def balanced_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int):
    """``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_rᵀ``: the best rank-r approximation, √Σ on each side."""
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]
