"""``x Sᵀ`` for a sparse ``S`` with a fixed support and trainable values, one autograd Function per path.

Each path saves only ``x`` and the values for backward (never a dense ``out×in`` matrix), and returns the
gradient of the values directly in the support's row-major order.

- ``gather``: lsparam's native kernels (:mod:`lsparam.sparse.native`, fp32/fp64 on CPU) where a C++
  compiler built them: one pass over the support per block of tokens, the block transposed once in
  cache. Elsewhere ``torch.nn.functional.embedding_bag`` over features-major blocks of ``x`` (128
  tokens): every sparse entry adds one contiguous row of the block into its output row; ``dX`` the same
  on ``Sᵀ`` (transposed for each call); ``dV`` with embedding_bag's per-sample-weight gradient (one dot
  product per entry). The fastest path on CPU, every dtype; the support holds 2 bytes per entry.
- ``csr``: CSR spmm forward, CSR of ``Sᵀ`` for ``dX`` (kept once built), ``sampled_addmm`` for ``dV`` (CPU
  fp32/fp64, CUDA), on int32 columns made for each call.
- ``scatter``: scatter the values into a dense ``S`` transiently and use dense GEMMs (any device/dtype;
  the SLTrain reference's approach, dense FLOPs, fastest at high density).
- ``semi-structured``: 2:4 sparse tensor cores for the forward (CUDA sm80+, fp16/bf16, 2:4 support).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsparam.sparse import csr_ops, native
from lsparam.sparse.support import SparseSupport

# Above this density a dense GEMM on a scattered S beats the sparse paths (see docs/benchmarks.md).
CSR_MAX_DENSITY = 0.1
_CSR_CPU_DTYPES = (torch.float32, torch.float64)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


# Tokens per embedding_bag call in the gather path. Each block of x is transposed on its own: a (128 × in)
# block transposes in cache, where a whole (T × in) transpose runs at a fraction of memory bandwidth, and
# the slice of xᵀ one call gathers from stays in L2.
GATHER_TOKEN_BLOCK = 128
GATHER_DV_BLOCK = 256  # dV: 256-token blocks measured fastest (128 to 2048 tried)
_bag_weight_backward = torch.ops.aten._embedding_bag_per_sample_weights_backward


def bag_sum(table: torch.Tensor, crow, col, weights, bags: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y[t, b] = Σ_k weights[k] · table[t, col[k]]`` over the entries ``k`` of CSR row ``b``; y is (T, bags).

    With ``out`` (T, bags), ``y`` is added into it in place (no T×bags temporary) and ``out`` returned.
    The native kernel where it is built (:mod:`lsparam.sparse.native`), else ``embedding_bag``, on int32
    columns made for the call (it takes int32 or int64 indices, of the offsets' dtype).
    """
    y = table.new_empty(table.shape[0], bags) if out is None else out
    if native.available(table, weights, y):
        native.spmm_add_(table, crow, col, weights, y, overwrite=out is None)
        return y
    col, offsets = col.to(torch.int32), crow[:-1].to(torch.int32)
    for start in range(0, table.shape[0], GATHER_TOKEN_BLOCK):
        block = table[start:start + GATHER_TOKEN_BLOCK].t().contiguous()  # features-major: rows are gathered
        part = F.embedding_bag(col, block, offsets, mode="sum", per_sample_weights=weights).t()
        if out is None:
            y[start:start + GATHER_TOKEN_BLOCK] = part
        else:
            y[start:start + GATHER_TOKEN_BLOCK] += part
    return y


def input_grad(grad: torch.Tensor, values: torch.Tensor, support: SparseSupport, out: torch.Tensor | None = None):
    """``dX = grad S`` (T × in), added into ``out`` if given. Either route sums over the transposed support,
    made for the call and dropped after it (the native kernel's counting sort, or a stable argsort here:
    under 1% of a layer's forward and backward), so that the support holds 2 bytes per entry."""
    if native.available(*((grad, values) if out is None else (grad, values, out))):
        y = grad.new_empty(grad.shape[0], support.shape[1]) if out is None else out
        native.spmm_t_add_(grad, support.crow_indices, support.col_indices, values, y, overwrite=out is None)
        return y
    crow_t, col_t, perm = support.transpose()
    return bag_sum(grad, crow_t, col_t, values.index_select(0, perm), support.shape[1], out=out)


def sparse_plus_mm(
    x: torch.Tensor, values: torch.Tensor, support: SparseSupport, left: torch.Tensor, right: torch.Tensor,
    alpha: float, transposed: bool = False,
) -> torch.Tensor:
    """``x Sᵀ + alpha · left @ right`` (``x S + ...`` with ``transposed``: ``dX``), the GEMM adding into the
    sparse product (its beta = 1): no temporary for either term, no pass reading one back. One op on the
    native kernels (:func:`lsparam.sparse.native.sparse_plus_mm`, which says why)."""
    crow, col = support.crow_indices, support.col_indices
    if native.available(x, values, left, right):
        return native.sparse_plus_mm(x, crow, col, values, left, right, alpha, transposed)
    y = input_grad(x, values, support) if transposed else bag_sum(x, crow, col, values, support.shape[0])
    return y.addmm_(left, right, alpha=alpha)


def entry_dots(grad: torch.Tensor, x: torch.Tensor, support: SparseSupport) -> torch.Tensor:
    """``dV[k] = Σ_t grad[t, row k] · x[t, col k]``, the gradient of the values, one block of tokens at a time."""
    if native.available(grad, x):
        return native.entry_dots(grad, x, support.crow_indices, support.col_indices)
    # each entry's row and int32 column: rebuilt per call (a fast pass over the CSR) rather than kept
    offsets, rows, cols = support.crow_indices[:-1], support.row_indices().to(torch.int32), support.columns(torch.int32)
    total = None
    for start in range(0, x.shape[0], GATHER_DV_BLOCK):
        g_block = grad[start:start + GATHER_DV_BLOCK].t().contiguous()
        x_block = x[start:start + GATHER_DV_BLOCK].t().contiguous()
        part = _bag_weight_backward(g_block, x_block, cols, offsets, rows, 0, -1)
        total = part if total is None else total.add_(part)
    return total


class _GatherMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, support: SparseSupport):
        x2 = _flatten(x)
        y = bag_sum(x2, support.crow_indices, support.col_indices, values, support.shape[0])
        ctx.support = support
        ctx.save_for_backward(x, values)
        return y.reshape(*x.shape[:-1], support.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, values = ctx.saved_tensors
        support = ctx.support
        g2 = _flatten(grad_out)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(g2, values, support).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_values = entry_dots(g2, _flatten(x), support)
        return grad_x, grad_values, None


class _CSRMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, support: SparseSupport):
        x2 = _flatten(x)
        y = csr_ops.spmm(support, values, x2)  # custom ops while compiling: see csr_ops
        ctx.support = support
        ctx.save_for_backward(x, values)
        return y.reshape(*x.shape[:-1], support.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, values = ctx.saved_tensors
        support = ctx.support
        g2 = _flatten(grad_out)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = csr_ops.input_grad(support, values, g2).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_values = csr_ops.entry_dots(support, values, g2, _flatten(x))
        return grad_x, grad_values, None


class _ScatterMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, support: SparseSupport):
        ctx.support = support
        ctx.save_for_backward(x, values)
        return x @ support.to_dense(values).t()

    @staticmethod
    def backward(ctx, grad_out):
        x, values = ctx.saved_tensors
        support = ctx.support
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ support.to_dense(values)  # S rebuilt: never kept between passes
        if ctx.needs_input_grad[1]:
            grad_dense = _flatten(grad_out).t() @ _flatten(x)
            grad_values = grad_dense.reshape(-1)[support.flat_indices()]
        return grad_x, grad_values, None


def semi_structured_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True on CUDA devices of compute capability 8.0+ with fp16/bf16, where 2:4 kernels exist."""
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(device) >= (8, 0)
        and dtype in (torch.float16, torch.bfloat16)
    )


class _SemiStructuredMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, support: SparseSupport):
        from torch.sparse import to_sparse_semi_structured

        ctx.support = support
        ctx.save_for_backward(x, values)
        weight = to_sparse_semi_structured(support.to_dense(values))
        x2 = _flatten(x)
        return torch.nn.functional.linear(x2, weight).reshape(*x.shape[:-1], support.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        # The transpose of a 2:4 matrix is not 2:4, so the backward uses dense GEMMs on a transient S.
        return _ScatterMatmul.backward(ctx, grad_out)


_PATHS = {"gather": _GatherMatmul, "csr": _CSRMatmul, "scatter": _ScatterMatmul, "semi-structured": _SemiStructuredMatmul}


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, density: float) -> str:
    """The concrete path ``"auto"`` stands for on this device and dtype; checks explicit choices.

    >>> resolve_backend("auto", torch.device("cpu"), torch.float32, 0.03)
    'gather'
    >>> resolve_backend("auto", torch.device("cpu"), torch.float32, 0.5)
    'scatter'
    """
    if backend == "auto":
        if density > CSR_MAX_DENSITY:
            return "scatter"
        return "gather" if device.type == "cpu" else "csr"
    if backend == "csr" and device.type == "cpu" and dtype not in _CSR_CPU_DTYPES:
        raise ValueError(
            f"sparse_backend='csr' has no CPU kernel for {dtype}; use 'scatter' or 'auto' "
            f"(valid CPU dtypes for csr: {[str(d) for d in _CSR_CPU_DTYPES]})"
        )
    if backend == "semi-structured" and not semi_structured_available(device, dtype):
        raise ValueError(
            f"sparse_backend='semi-structured' needs a CUDA device of compute capability 8.0+ and "
            f"float16/bfloat16 weights; got device={device}, dtype={dtype}"
        )
    if backend not in _PATHS:
        raise ValueError(f"unknown sparse backend {backend!r}; valid: {['auto', *_PATHS]}")
    return backend


def is_shape_only(tensor: torch.Tensor) -> bool:
    """True for meta and fake tensors, which carry shapes but no data (used by memory estimates)."""
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling():  # every tensor is fake while compiling; the compiled code runs on real ones
        return tensor.is_meta
    return tensor.is_meta or is_fake(tensor)


def sparse_linear(x: torch.Tensor, values: torch.Tensor, support: SparseSupport, backend: str) -> torch.Tensor:
    """``x Sᵀ`` where ``S`` has ``values`` on ``support``, through the named path (already resolved).

    Example:
        >>> s = SparseSupport(torch.tensor([1, 4, 5]), (2, 3), persistent=False)
        >>> v = torch.tensor([1., 2., 3.], dtype=torch.float64)
        >>> x = torch.ones(1, 3, dtype=torch.float64)
        >>> sparse_linear(x, v, s, "csr").tolist(), sparse_linear(x, v, s, "scatter").tolist()
        ([[1.0, 5.0]], [[1.0, 5.0]])
    """
    return _PATHS[backend].apply(x, values, support)
