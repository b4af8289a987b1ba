"""Fixed sparse supports in CSR form, with int32 indices.

A support is regenerated from ``(seed, layer name, shape)`` rather than stored, so a checkpoint carries
no index tensor for SLTrain's random support. Supports chosen from data (``init="dense"``) are stored,
as int32.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def derived_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, stable across processes and platforms.

    >>> derived_seed(0, "layers.0.q_proj", (8, 8)) == derived_seed(0, "layers.0.q_proj", (8, 8))
    True
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def uniform_flat_indices(numel: int, nnz: int, seed: int) -> torch.Tensor:
    """``nnz`` distinct positions in ``range(numel)``, uniform without replacement, sorted (int64)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=generator)[:nnz].sort().values


def two_four_flat_indices(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A 2:4 support: in every row, 2 random positions out of each group of 4 columns (sorted, int64)."""
    if in_features % 4:
        raise ValueError(f"a 2:4 support needs in_features divisible by 4; got in_features={in_features}")
    generator = torch.Generator().manual_seed(seed)
    groups = out_features * (in_features // 4)
    keep = torch.rand(groups, 4, generator=generator).argsort(dim=1)[:, :2].sort(dim=1).values
    flat = torch.arange(groups)[:, None] * 4 + keep
    return flat.reshape(-1)


def largest_magnitude_flat_indices(matrix: torch.Tensor, nnz: int) -> torch.Tensor:
    """Positions of the ``nnz`` largest-magnitude entries of ``matrix`` (sorted, int64)."""
    return matrix.detach().abs().reshape(-1).topk(nnz).indices.sort().values.cpu()


class SparseSupport(nn.Module):
    """The support of an ``out×in`` sparse matrix in CSR form, plus its transpose (built on first use).

    Values of the matrix live elsewhere (a trainable vector in row-major order of the support).

    Args:
        flat_indices: sorted, unique row-major positions (``row * in + col``).
        shape: ``(out, in)``.
        persistent: whether the indices go into the state_dict (False when they are regenerated).

    Example:
        >>> s = SparseSupport(torch.tensor([1, 4, 5]), (2, 3), persistent=False)
        >>> s.crow_indices.tolist(), s.col_indices.tolist()
        ([0, 1, 3], [1, 1, 2])
        >>> s.to_dense(torch.tensor([1., 2., 3.])).tolist()
        [[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]]
    """

    def __init__(self, flat_indices: torch.Tensor | None, shape: tuple[int, int], *, persistent: bool, nnz: int = 0):
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        if flat_indices is None:  # shapes only (memory estimates on fake tensors): arrays of the right sizes
            crow, col = torch.zeros(self.shape[0] + 1, dtype=torch.int32), torch.zeros(nnz, dtype=torch.int32)
        else:
            crow, col = self._csr_arrays(flat_indices)
        self.register_buffer("crow_indices", crow, persistent=persistent)
        self.register_buffer("col_indices", col, persistent=persistent)
        self._transpose = None  # (crow_t, col_t, perm) on the device of the indices

    @property
    def nnz(self) -> int:
        return self.col_indices.numel()

    def _csr_arrays(self, flat: torch.Tensor):
        out_features, in_features = self.shape
        flat = flat.to(torch.int64).cpu()
        rows = flat // in_features
        crow = torch.zeros(out_features + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
        return crow.to(torch.int32), (flat % in_features).to(torch.int32)

    def reset(self, flat_indices: torch.Tensor) -> None:
        """Replace the support in place (same nnz), e.g. after a re-initialisation from a new weight."""
        crow, col = self._csr_arrays(flat_indices)
        self.crow_indices.copy_(crow)
        self.col_indices.copy_(col)
        self._transpose = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._transpose = None

    def _apply(self, fn, *args, **kwargs):
        self._transpose = None
        return super()._apply(fn, *args, **kwargs)

    def row_indices(self) -> torch.Tensor:
        counts = (self.crow_indices[1:] - self.crow_indices[:-1]).to(torch.int64)
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts, output_size=self.nnz)

    def flat_indices(self) -> torch.Tensor:
        """Row-major positions as int64 (a transient: built when needed, not kept)."""
        return self.row_indices() * self.shape[1] + self.col_indices.to(torch.int64)

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(
            self.crow_indices, self.col_indices, values, self.shape, check_invariants=False
        )

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(crow, col, perm)`` of the ``in×out`` transpose in CSR form (int32, cached): its values are
        ``values[perm]``."""
        if self._transpose is None:
            rows = self.row_indices()
            cols = self.col_indices.to(torch.int64)
            perm = torch.argsort(cols * self.shape[0] + rows)
            crow_t = torch.zeros(self.shape[1] + 1, dtype=torch.int64, device=cols.device)
            crow_t[1:] = torch.bincount(cols, minlength=self.shape[1]).cumsum(0)
            self._transpose = (crow_t.to(torch.int32), rows[perm].to(torch.int32), perm.to(torch.int32))
        return self._transpose

    def csr_transposed(self, values: torch.Tensor) -> torch.Tensor:
        """The ``in×out`` transpose in CSR form, its values permuted from ``values``."""
        crow_t, col_t, perm = self.transposed()
        return torch.sparse_csr_tensor(
            crow_t, col_t, values.index_select(0, perm), (self.shape[1], self.shape[0]), check_invariants=False
        )

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """The dense ``out×in`` matrix (differentiable in ``values``)."""
        dense = values.new_zeros(self.shape[0] * self.shape[1])
        return dense.index_put((self.flat_indices(),), values).view(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.nnz}"
