"""Native CPU kernels for SLTrain's sparse products, compiled at first use (``native.cpp`` says why).

The kernel source is built once per source version and CPU with the system's C++ compiler (``$CXX``, else
``c++``) into ``$LSPARAM_CACHE`` (default ``~/.cache/lsparam``) and loaded with ctypes: a plain C ABI
builds in under a second, where a PyTorch C++ extension would compile its headers for a minute. The three
products (forward, ``dX``, ``dV``) are registered as PyTorch custom ops, so ``torch.compile`` traces through
them; eager calls go straight to the library. They read the support as :class:`~lsparam.sparse.SparseSupport`
holds it: int32 row pointers, uint16 columns (int32 past 65,536 wide).

Without a compiler (a warning says so once), with ``LSPARAM_NATIVE=0`` or within :func:`disabled`,
:func:`available` is False and the callers in :mod:`lsparam.sparse.matmul` use PyTorch's
``embedding_bag`` route instead: same results, slower (docs/benchmarks.md).

Example:
    >>> import torch
    >>> from lsparam.sparse import native
    >>> x = torch.tensor([[1., 2., 3.]])
    >>> crow, col = torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([1, 0, 2], dtype=torch.uint16)
    >>> out = torch.zeros(1, 2)
    >>> if native.available(x):  # S = [[0, 10, 0], [1, 0, 1]]
    ...     native.spmm_add_(x, crow, col, torch.tensor([10., 1., 1.]), out)
    ... else:
    ...     out += x @ torch.tensor([[0., 10., 0.], [1., 0., 1.]]).t()
    >>> out.tolist()
    [[20.0, 4.0]]
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
INDEX_TYPES = {torch.uint16: "u16", torch.int32: "i32"}  # column indices: see SparseSupport


class NativeBuildError(RuntimeError):
    """The C++ compiler could not build ``native.cpp``."""


def _cpu_fingerprint() -> str:
    # -march=native code is only valid on CPUs with the same features: a shared home directory on a
    # cluster of mixed nodes must not hand one node's library to another
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def build(cache_dir: Path, cxx: str) -> Path:
    """Compile ``native.cpp`` into ``cache_dir`` (once per source, flags, compiler and CPU); its path.

    The library is written under a temporary name and renamed into place, so processes building at
    the same time never load a half-written file.
    """
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, cxx, _cpu_fingerprint()]).encode()).hexdigest()[:16]
    target = cache_dir / f"lsparam-native-{key}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=False)
    except OSError as error:  # no such compiler
        os.unlink(tmp)
        raise NativeBuildError(f"cannot run the C++ compiler {cxx!r}: {error}") from error
    if result.returncode != 0:
        os.unlink(tmp)
        raise NativeBuildError(f"{cxx} {' '.join(FLAGS)} failed:\n{result.stderr.strip()[-2000:]}")
    os.replace(tmp, target)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they are switched off or cannot be built (warned once)."""
    if os.environ.get("LSPARAM_NATIVE", "1") == "0":
        return None
    cache_dir = Path(os.environ.get("LSPARAM_CACHE", Path.home() / ".cache" / "lsparam"))
    try:
        lib = ctypes.CDLL(str(build(cache_dir, os.environ.get("CXX", "c++"))))
    except (NativeBuildError, OSError) as error:
        warnings.warn(
            f"lsparam: the native sparse kernels are not available ({error}); SLTrain's CPU path falls back "
            "to torch.embedding_bag, which is slower. Install a C++ compiler with OpenMP (g++), or set "
            "LSPARAM_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    i64, vp, int_ = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for suffix in (f"{t}_{i}" for t in DTYPES.values() for i in INDEX_TYPES.values()):
        getattr(lib, f"lsparam_spmm_add_{suffix}").argtypes = [vp, i64, i64, i64, vp, vp, vp, i64, vp, i64, int_, int_]
        getattr(lib, f"lsparam_spmm_t_add_{suffix}").argtypes = [vp, i64, i64, i64, vp, vp, vp, i64, vp, i64, int_, int_]
        getattr(lib, f"lsparam_entry_dots_{suffix}").argtypes = [vp, i64, vp, i64, i64, i64, vp, vp, i64, vp, int_]
    lib.lsparam_vector_bytes.argtypes, lib.lsparam_vector_bytes.restype = [], int_
    return lib


def vector_bytes() -> int:
    """The width of the kernels' vectors in bytes: 64 where the CPU has AVX-512, 32 with AVX2, else 16
    (0 where the kernels are not built). The kernels are built for the CPU they run on
    (``-march=native``); a library built for narrower registers than the CPU's runs several times slower.

    Example:
        >>> vector_bytes() in (0, 16, 32, 64)
        True
    """
    lib = library()
    return 0 if lib is None else int(lib.lsparam_vector_bytes())


_disabled = False


@contextlib.contextmanager
def disabled():
    """Within the block, the callers take the embedding_bag route (for comparisons and debugging).

    Example:
        >>> with disabled():
        ...     available(torch.zeros(1))
        False
    """
    global _disabled
    before, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = before


@torch.compiler.assume_constant_result  # compile: a constant, not a trace into the cached build
def built() -> bool:
    """Whether the kernels are loaded (building them on the first call)."""
    return library() is not None


def available(*tensors: torch.Tensor) -> bool:
    """True when the kernels are built and every tensor is a CPU float32/float64 tensor of one dtype."""
    dtype = tensors[0].dtype
    return (
        not _disabled
        and dtype in DTYPES
        and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
        and built()
    )


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_support(crow: torch.Tensor, col: torch.Tensor) -> None:
    if crow.dtype != torch.int32 or col.dtype not in INDEX_TYPES or not (crow.is_contiguous() and col.is_contiguous()):
        raise ValueError(
            f"the support must be contiguous arrays, int32 row pointers and uint16 or int32 columns; got crow "
            f"{crow.dtype}, col {col.dtype}"
        )


def _kernel(product: str, dtype: torch.dtype, col: torch.Tensor):
    """The library's function for this product, value dtype and column type."""
    return getattr(library(), f"lsparam_{product}_{DTYPES[dtype]}_{INDEX_TYPES[col.dtype]}")


def _into_rows(out: torch.Tensor, put, overwrite: bool) -> None:
    """``put(target)`` on ``out`` where its rows are contiguous, else on a copy written back (``put``
    writes over the copy, which is then added to ``out`` or, with ``overwrite``, copied into it)."""
    if out.stride(-1) == 1:
        put(out, overwrite)
        return
    target = torch.empty_like(out, memory_format=torch.contiguous_format)
    put(target, True)
    out.copy_(target) if overwrite else out.add_(target)


def _spmm_add(
    x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out: torch.Tensor, overwrite: bool
) -> None:
    _check_support(crow, col)
    x, values = _rows_contiguous(x), values.contiguous()
    _into_rows(out, lambda target, overwrite: _kernel("spmm_add", x.dtype, col)(
        x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], crow.data_ptr(), col.data_ptr(), values.data_ptr(),
        out.shape[1], target.data_ptr(), target.stride(0), overwrite, torch.get_num_threads(),
    ), overwrite)


def _spmm_t_add(
    grad: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out: torch.Tensor, overwrite: bool
) -> None:
    _check_support(crow, col)
    grad, values = _rows_contiguous(grad), values.contiguous()
    _into_rows(out, lambda target, overwrite: _kernel("spmm_t_add", grad.dtype, col)(
        grad.data_ptr(), grad.stride(0), grad.shape[0], grad.shape[1], crow.data_ptr(), col.data_ptr(),
        values.data_ptr(), out.shape[1], target.data_ptr(), target.stride(0), overwrite, torch.get_num_threads(),
    ), overwrite)


def _entry_dots(grad: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    _check_support(crow, col)
    grad, x = _rows_contiguous(grad), _rows_contiguous(x)
    out = x.new_empty(col.numel())
    _kernel("entry_dots", x.dtype, col)(
        grad.data_ptr(), grad.stride(0), x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], crow.data_ptr(),
        col.data_ptr(), crow.numel() - 1, out.data_ptr(), torch.get_num_threads(),
    )
    return out


def _sparse_plus_mm(
    x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, left: torch.Tensor,
    right: torch.Tensor, alpha: float, transposed: bool,
) -> torch.Tensor:
    out = x.new_empty(x.shape[0], right.shape[1])
    (_spmm_t_add if transposed else _spmm_add)(x, crow, col, values, out, True)
    return out.addmm_(left, right, alpha=alpha)


# Registered as custom ops so that torch.compile traces them. Eager calls skip the dispatcher, whose
# wrapper costs 0.06-0.17 ms per call (measured): at LLaMA-60M, three calls per layer and step.
SPMM_ADD, SPMM_T_ADD, ENTRY_DOTS = "lsparam::spmm_add_", "lsparam::spmm_t_add_", "lsparam::entry_dots"
spmm_add_op = torch.library.custom_op(SPMM_ADD, _spmm_add, mutates_args=("out",), device_types="cpu")
spmm_t_add_op = torch.library.custom_op(SPMM_T_ADD, _spmm_t_add, mutates_args=("out",), device_types="cpu")
entry_dots_op = torch.library.custom_op(ENTRY_DOTS, _entry_dots, mutates_args=(), device_types="cpu")
SPARSE_PLUS_MM = "lsparam::sparse_plus_mm"
sparse_plus_mm_op = torch.library.custom_op(SPARSE_PLUS_MM, _sparse_plus_mm, mutates_args=(), device_types="cpu")


@spmm_add_op.register_fake
def _(x, crow, col, values, out, overwrite) -> None:
    return None


@spmm_t_add_op.register_fake
def _(grad, crow, col, values, out, overwrite) -> None:
    return None


@entry_dots_op.register_fake
def _(grad, x, crow, col):
    return x.new_empty(col.numel())


@sparse_plus_mm_op.register_fake
def _(x, crow, col, values, left, right, alpha, transposed):
    return x.new_empty(x.shape[0], right.shape[1])


def _eager(name: str, implementation):
    """Call ``implementation`` directly, under the op's name in ``torch.profiler`` traces when one runs."""

    def call(*args):
        if not getattr(torch.autograd.profiler, "_is_profiler_enabled", True):  # record_function costs a dispatch
            return implementation(*args)
        with torch.profiler.record_function(name):
            return implementation(*args)

    return call


_spmm_add_eager, _spmm_t_add_eager = _eager(SPMM_ADD, _spmm_add), _eager(SPMM_T_ADD, _spmm_t_add)
_entry_dots_eager = _eager(ENTRY_DOTS, _entry_dots)
_sparse_plus_mm_eager = _eager(SPARSE_PLUS_MM, _sparse_plus_mm)


def spmm_add_(
    x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out: torch.Tensor, overwrite: bool = False
) -> None:
    """``out += x Sᵀ`` in place (``out = x Sᵀ`` with ``overwrite``: ``out`` need not be zeroed), for ``x``
    (tokens × in) and ``S`` (rows × in) in CSR form with ``values``."""
    (spmm_add_op if torch.compiler.is_compiling() else _spmm_add_eager)(x, crow, col, values, out, overwrite)


def spmm_t_add_(
    grad: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out: torch.Tensor, overwrite: bool = False
) -> None:
    """``out += grad S`` in place (``out = grad S`` with ``overwrite``), for ``grad`` (tokens × rows) and ``S``
    (rows × in) in CSR form with ``values``: ``dX``, on the same row-major support as the forward."""
    (spmm_t_add_op if torch.compiler.is_compiling() else _spmm_t_add_eager)(grad, crow, col, values, out, overwrite)


def entry_dots(grad: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``out[k] = Σ_t grad[t, row k] · x[t, col k]`` for each entry ``k`` of the CSR support (row-major)."""
    return (entry_dots_op if torch.compiler.is_compiling() else _entry_dots_eager)(grad, x, crow, col)


def sparse_plus_mm(
    x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, left: torch.Tensor,
    right: torch.Tensor, alpha: float = 1.0, transposed: bool = False,
) -> torch.Tensor:
    """``x Sᵀ + alpha · left @ right`` as a new tensor (``x S + ...`` with ``transposed``): the sparse product
    is written first and the GEMM adds into it (its beta = 1). One op, so that a compiled graph keeps that
    in place: traced as a kernel writing its output and an ``addmm_`` on it, the GEMM became an
    out-of-place ``addmm`` that first copies the kernel's output into a new buffer.

    Example:
        >>> x = torch.tensor([[1., 2., 3.]])
        >>> crow, col = torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([1, 0, 2], dtype=torch.uint16)
        >>> if available(x):  # S = [[0, 10, 0], [1, 0, 1]], plus 2 · [[1]] @ [[1, 1]]
        ...     y = sparse_plus_mm(x, crow, col, torch.tensor([10., 1., 1.]), torch.ones(1, 1), torch.ones(1, 2), 2.0)
        ... else:
        ...     y = x @ torch.tensor([[0., 10., 0.], [1., 0., 1.]]).t() + 2
        >>> y.tolist()
        [[22.0, 6.0]]
    """
    op = sparse_plus_mm_op if torch.compiler.is_compiling() else _sparse_plus_mm_eager
    return op(x, crow, col, values, left, right, alpha, transposed)
