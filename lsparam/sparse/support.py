"""Fixed sparse supports in CSR form: 16-bit column indices (2 bytes per entry) and int32 row pointers.

A support is regenerated from ``(seed, layer name, shape)`` rather than stored, so a checkpoint carries
no index tensor for SLTrain's random support. Supports chosen from data (``init="dense"``) are stored,
in the same arrays.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake


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


def column_dtype(in_features: int) -> torch.dtype:
    """The column indices' dtype: ``uint16`` where every column fits (``in_features <= 65,536``: every LLaMA
    width), else ``int32``.

    ``uint16`` rather than ``int16`` holding shifted or reinterpreted bits: its values are the columns
    themselves, so ``copy_`` between it and int32 or int64 is exact both ways. A state_dict of an int32
    support (saved before 16-bit columns) loads into it, and lsparam versions that hold int32 columns
    load one saved from it.

    >>> column_dtype(5461), column_dtype(65536), column_dtype(65537)
    (torch.uint16, torch.uint16, torch.int32)
    """
    return torch.uint16 if in_features <= 2**16 else torch.int32


class SparseSupport(nn.Module):
    """The support of an ``out×in`` sparse matrix in CSR form: ``crow_indices`` (``out + 1`` int32 row
    pointers) and ``col_indices`` (``nnz`` columns, sorted within each row, of :func:`column_dtype`).

    Values of the matrix live elsewhere (a trainable vector in row-major order of the support). The
    native kernels read these arrays as they are; the routes on PyTorch's sparse ops take int32 columns
    made for each call, and the transpose ``dX`` needs: made for each backward on the gather path
    (:meth:`transpose`), kept once built on the CSR path (:meth:`transposed`, listed by
    :meth:`index_tensors`).

    Args:
        flat_indices: sorted, unique row-major positions (``row * in + col``).
        shape: ``(out, in)``.
        persistent: whether the indices go into the state_dict (False when they are regenerated).

    Example:
        >>> s = SparseSupport(torch.tensor([1, 4, 5]), (2, 3), persistent=False)
        >>> s.crow_indices.tolist(), s.col_indices.tolist(), s.col_indices.dtype
        ([0, 1, 3], [1, 1, 2], torch.uint16)
        >>> s.to_dense(torch.tensor([1., 2., 3.])).tolist()
        [[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]]
    """

    def __init__(self, flat_indices: torch.Tensor | None, shape: tuple[int, int], *, persistent: bool, nnz: int = 0):
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        count = nnz if flat_indices is None else flat_indices.numel()
        if count >= 2**31:  # the row pointers are int32, as the kernels and cuSPARSE's 32-bit mode read them
            raise ValueError(f"a sparse support of {count} entries (shape {self.shape}) is over the 2**31 - 1 the "
                             "int32 row pointers hold; use a lower density or split the layer")
        if flat_indices is None:  # shapes only (memory estimates on fake tensors): arrays of the right sizes
            crow = torch.zeros(self.shape[0] + 1, dtype=torch.int32)
            col = torch.zeros(nnz, dtype=column_dtype(self.shape[1]))
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
        return crow.to(torch.int32), (flat % in_features).to(column_dtype(in_features))

    def reset(self, flat_indices: torch.Tensor) -> None:
        """Replace the support in place (same nnz), e.g. after a re-initialisation from a new weight."""
        crow, col = self._csr_arrays(flat_indices)
        self.crow_indices.copy_(crow)
        self.col_indices.copy_(col)
        self._transpose = None

    def holds_valid_csr(self) -> bool:
        """Whether the arrays are a support of this shape: row pointers from 0 to ``nnz``, non-decreasing,
        and in each row columns in range and increasing (uninitialised memory is not). Shape-only arrays
        (meta, fake) count as valid.

        >>> s = SparseSupport(torch.tensor([1, 4, 5]), (2, 3), persistent=False)
        >>> s.holds_valid_csr()
        True
        >>> _ = s.col_indices.fill_(3)  # a column past the shape's 3
        >>> s.holds_valid_csr()
        False
        """
        if self.crow_indices.is_meta or is_fake(self.crow_indices):
            return True
        crow, cols = self.crow_indices.to(torch.int64), self.col_indices.to(torch.int64)
        nnz = cols.numel()
        if crow.numel() != self.shape[0] + 1 or crow[0] != 0 or crow[-1] != nnz or bool((crow.diff() < 0).any()):
            return False
        if nnz and (int(cols.min()) < 0 or int(cols.max()) >= self.shape[1]):
            return False
        row_start = torch.zeros(nnz, dtype=torch.bool, device=cols.device)
        row_start[crow[:-1][crow[:-1] < nnz]] = True
        return bool(((cols.diff() > 0) | row_start[1:]).all())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)  # copy_ converts an int32 state_dict's columns exactly
        wanted = column_dtype(self.shape[1])
        if self.col_indices.dtype != wanted:  # load_state_dict(assign=True) puts the saved tensor itself here
            self.col_indices = self.col_indices.to(wanted)
        if self.crow_indices.dtype != torch.int32:
            self.crow_indices = self.crow_indices.to(torch.int32)
        self._transpose = None

    def _apply(self, fn, *args, **kwargs):
        self._transpose = None
        return super()._apply(fn, *args, **kwargs)

    def columns(self, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """The column indices widened to ``dtype`` (a transient, for ops that take int32/int64 indices)."""
        return self.col_indices.to(dtype)

    def row_indices(self) -> torch.Tensor:
        counts = (self.crow_indices[1:] - self.crow_indices[:-1]).to(torch.int64)
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts, output_size=self.nnz)

    def flat_indices(self) -> torch.Tensor:
        """Row-major positions as int64 (a transient: built when needed, not kept)."""
        return self.row_indices() * self.shape[1] + self.columns()

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """``S`` as a torch CSR tensor, on int32 columns made for it (PyTorch's CSR kernels and cuSPARSE take
        int32 or int64 indices, one dtype for both arrays)."""
        return torch.sparse_csr_tensor(
            self.crow_indices, self.columns(torch.int32), values, self.shape, check_invariants=False
        )

    def transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(crow, col, perm)`` of the ``in×out`` transpose in CSR form (int32, made for the caller and not
        kept): its values are ``values[perm]``."""
        cols = self.columns(torch.int32)
        # the support is row-major, so a stable sort by column leaves each column's rows in order
        perm = torch.argsort(cols, stable=True)
        crow_t = torch.zeros(self.shape[1] + 1, dtype=torch.int64, device=cols.device)
        # counted by index_add_, not bincount, whose output size torch.compile cannot know (a graph break)
        counts = torch.zeros(self.shape[1], dtype=torch.int64, device=cols.device)
        crow_t[1:] = counts.index_add_(0, cols, torch.ones_like(cols, dtype=torch.int64)).cumsum(0)
        return crow_t.to(torch.int32), self.row_indices()[perm].to(torch.int32), perm.to(torch.int32)

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`transpose`, kept once built (8 bytes per entry): for the CSR path, which runs on CUDA
        where rebuilding it for each backward was not measured. The gather path never keeps it."""
        if self._transpose is None:
            self._transpose = self.transpose()
        return self._transpose

    def index_tensors(self) -> list[torch.Tensor]:
        """The index tensors held now: the CSR arrays, and the transposed copy once a path has built it."""
        return [self.crow_indices, self.col_indices, *(self._transpose or ())]

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
