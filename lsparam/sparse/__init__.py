"""Sparse paths: fixed supports in CSR form and the matmuls that use them."""

from lsparam.sparse.matmul import resolve_backend, sparse_linear
from lsparam.sparse.support import SparseSupport

__all__ = ["SparseSupport", "resolve_backend", "sparse_linear"]
