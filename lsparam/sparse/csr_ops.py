"""The CSR path's three products (``x Sᵀ``, ``dX = grad S``, ``dV``), eager or as PyTorch custom ops.

``torch.compile`` cannot trace the creation of a sparse tensor: each ``torch.sparse_csr_tensor`` was a
graph break, three per layer and step. While compiling, the products therefore run as custom ops
(``lsparam::csr_mm``, ``lsparam::csr_entry_dots``) that build their CSR tensor inside, opaque to the
tracer, with shape-only implementations for it. Eager calls skip the dispatcher and build the CSR tensors
directly, as before.

One difference while compiling: ``dX`` makes the support's transpose for each backward (a stable sort of
the columns, traced into the graph) instead of keeping it on the support (:meth:`SparseSupport.transposed`),
since a compiled backward cannot store a cache on a module.
"""

from __future__ import annotations

import torch

from lsparam.sparse.support import SparseSupport


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    # PyTorch's CSR kernels and cuSPARSE take int32 or int64 indices, one dtype for both arrays
    return torch.sparse_csr_tensor(crow, col.to(crow.dtype), values, shape, check_invariants=False)


@torch.library.custom_op("lsparam::csr_mm", mutates_args=())
def csr_mm(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, rows: int) -> torch.Tensor:
    """``dense Sᵀ`` (tokens × rows) for ``S`` (rows × dense's width) in CSR form; a column-major result."""
    return (_csr(crow, col, values, (rows, dense.shape[1])) @ dense.t()).t()


@csr_mm.register_fake
def _(crow, col, values, dense, rows):
    return dense.new_empty(rows, dense.shape[0]).t()  # the strides of the real result


@torch.library.custom_op("lsparam::csr_entry_dots", mutates_args=())
def csr_entry_dots(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, grad: torch.Tensor,
                   x: torch.Tensor) -> torch.Tensor:
    """``dV[k] = Σ_t grad[t, row k] · x[t, col k]`` over the support (``values`` only shape the pattern)."""
    pattern = _csr(crow, col, values, (grad.shape[1], x.shape[1]))
    return torch.sparse.sampled_addmm(pattern, grad.t(), x, beta=0.0).values()


@csr_entry_dots.register_fake
def _(crow, col, values, grad, x):
    return values.new_empty(col.numel())


def spmm(support: SparseSupport, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x Sᵀ`` for ``x`` (tokens × in)."""
    if torch.compiler.is_compiling():
        return csr_mm(support.crow_indices, support.col_indices, values, x, support.shape[0])
    return (support.csr(values) @ x.t()).t()


def input_grad(support: SparseSupport, values: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad S`` for ``grad`` (tokens × out), on the transposed support."""
    if torch.compiler.is_compiling():
        crow_t, col_t, perm = support.transpose()
        return csr_mm(crow_t, col_t, values.index_select(0, perm), grad, support.shape[1])
    return (support.csr_transposed(values) @ grad.t()).t()


def entry_dots(support: SparseSupport, values: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The values' gradient, in the support's row-major order."""
    values = values.detach()
    if torch.compiler.is_compiling():
        return csr_entry_dots(support.crow_indices, support.col_indices, values, grad, x)
    return torch.sparse.sampled_addmm(support.csr(values), grad.t(), x, beta=0.0).values()
