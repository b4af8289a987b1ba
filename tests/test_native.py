"""The native sparse kernels (lsparam/sparse/native.cpp) against dense float64 math, and their fallback."""

import contextlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsparam import SLTrainConfig, parametrize
from lsparam.sparse import SparseSupport, native
from lsparam.sparse.support import uniform_flat_indices

needs_native = pytest.mark.skipif(
    not native.available(torch.zeros(1)), reason="the native kernels could not be built (no C++ compiler?)"
)
TOLERANCE = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-5, "atol": 1e-4}}


def drop_rows(flat: torch.Tensor, features: int, empty: torch.Tensor) -> torch.Tensor:
    """``flat`` without the entries of the rows flagged in ``empty`` (one entry left if none would be)."""
    kept = flat[~empty[flat // features]]
    return kept if kept.numel() else flat[:1]


@st.composite
def kernel_problems(draw):
    """Supports over more than one row block (128 rows) and partial transpose tiles (lanes × lanes: 16 or 8
    float32), with rows left empty, token counts across the kernels' blocks (up to 32 float32 tokens
    forward, 128 for dV, by thread count and vector width; half as many float64) and a single token, on
    1 to 3 threads, activations whose rows are longer than their width; columns as SparseSupport holds
    them (uint16) or as int32."""
    rows, features = draw(st.integers(1, 300)), draw(st.integers(1, 1100))
    tokens = draw(st.sampled_from([0, 1, 2]) | st.integers(0, 300))
    nnz = max(1, int(draw(st.floats(0.0005, 0.3)) * rows * features))
    seed = draw(st.integers(0, 2**31))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    pad = draw(st.integers(0, 3))
    generator = torch.Generator().manual_seed(seed)
    flat = uniform_flat_indices(rows * features, nnz, seed)
    if draw(st.booleans()):  # some rows without any entry
        flat = drop_rows(flat, features, torch.rand(rows, generator=generator) < 0.3)
    support = SparseSupport(flat, (rows, features), persistent=False)
    col = support.col_indices if draw(st.booleans()) else support.col_indices.to(torch.int32)
    values = torch.randn(support.nnz, dtype=torch.float64, generator=generator)
    x = torch.randn(tokens, features + pad, dtype=torch.float64, generator=generator)[:, :features]
    grad = torch.randn(tokens, rows, dtype=torch.float64, generator=generator)
    return support, col, values, x, grad, dtype, draw(st.integers(1, 3))


@contextlib.contextmanager
def num_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@needs_native
@settings(max_examples=60, deadline=None)
@given(problem=kernel_problems(), transposed_out=st.booleans(), overwrite=st.booleans())
def test_spmm_add_adds_x_times_s_transposed(problem, transposed_out, overwrite):
    support, col, values, x, _, dtype, threads = problem
    # overwriting: out starts as NaN, so an element the kernel leaves unwritten fails the comparison
    start = torch.full((x.shape[0], support.shape[0]), torch.nan if overwrite else 0.0, dtype=torch.float64)
    if not overwrite:
        start.normal_()
    out = start.to(dtype, copy=True)
    if transposed_out:  # rows not contiguous: the op works on a copy and adds it back
        out = out.t().contiguous().t()
    with num_threads(threads):
        native.spmm_add_(x.to(dtype), support.crow_indices, col, values.to(dtype), out, overwrite=overwrite)
    expected = (0 if overwrite else start) + x @ dense_of(support, values).t()
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])


@needs_native
@settings(max_examples=60, deadline=None)
@given(problem=kernel_problems(), transposed_out=st.booleans(), overwrite=st.booleans())
def test_spmm_t_add_adds_grad_times_s(problem, transposed_out, overwrite):
    support, col, values, _, grad, dtype, threads = problem
    start = torch.full((grad.shape[0], support.shape[1]), torch.nan if overwrite else 0.0, dtype=torch.float64)
    if not overwrite:
        start.normal_()
    out = start.to(dtype, copy=True)
    if transposed_out:
        out = out.t().contiguous().t()
    with num_threads(threads):
        native.spmm_t_add_(grad.to(dtype), support.crow_indices, col, values.to(dtype), out, overwrite=overwrite)
    expected = (0 if overwrite else start) + grad @ dense_of(support, values)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])


@needs_native
@settings(max_examples=60, deadline=None)
@given(problem=kernel_problems())
def test_entry_dots_are_the_sampled_entries_of_grad_t_x(problem):
    support, col, _, x, grad, dtype, threads = problem
    with num_threads(threads):
        dots = native.entry_dots(grad.to(dtype), x.to(dtype), support.crow_indices, col)
    expected = (grad.t() @ x)[rows_of(support), support.col_indices.to(torch.int64)]
    torch.testing.assert_close(dots.double(), expected, **TOLERANCE[dtype])


@needs_native
@settings(max_examples=40, deadline=None)
@given(problem=kernel_problems(), transposed=st.booleans(), rank=st.integers(1, 9), alpha=st.floats(-2, 2))
def test_sparse_plus_mm_adds_the_gemm_to_the_sparse_product(problem, transposed, rank, alpha):
    support, col, values, x, grad, dtype, threads = problem
    left = torch.randn(x.shape[0], rank, dtype=torch.float64)
    right = torch.randn(rank, support.shape[1 if transposed else 0], dtype=torch.float64)
    inputs = grad if transposed else x
    with num_threads(threads):
        y = native.sparse_plus_mm(
            inputs.to(dtype), support.crow_indices, col, values.to(dtype), left.to(dtype), right.to(dtype), alpha,
            transposed,
        )
    dense = dense_of(support, values)
    expected = inputs @ (dense if transposed else dense.t()) + alpha * left @ right
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])


def rows_of(support: SparseSupport) -> torch.Tensor:
    """Each entry's row, from the row pointers by a plain loop (not the code under test)."""
    crow = support.crow_indices.tolist()
    return torch.tensor([r for r in range(support.shape[0]) for _ in range(crow[r + 1] - crow[r])], dtype=torch.int64)


def dense_of(support: SparseSupport, values: torch.Tensor) -> torch.Tensor:
    """S in float64, placed entry by entry from the CSR arrays."""
    dense = torch.zeros(support.shape, dtype=torch.float64)
    dense[rows_of(support), support.col_indices.to(torch.int64)] = values.to(torch.float64)
    return dense


@needs_native
@settings(max_examples=12, deadline=None)
@given(
    features=st.sampled_from([32767, 32768, 32769, 65535, 65536, 65537]),
    rows=st.integers(1, 3),
    tokens=st.integers(1, 20),
    seed=st.integers(0, 2**31),
)
def test_the_kernels_read_columns_past_the_int16_range(features, rows, tokens, seed):
    """Columns of 32,768 and up (negative as int16), up to the last uint16 one, and int32 past 65,536."""
    generator = torch.Generator().manual_seed(seed)
    flat = uniform_flat_indices(rows * features, 40, seed)
    flat = torch.cat([flat, torch.tensor([features - 1, features - 2, 32767, 32768])]).unique()  # the edges
    flat = flat[flat < rows * features]
    support = SparseSupport(flat, (rows, features), persistent=False)
    assert support.col_indices.dtype == (torch.uint16 if features <= 65536 else torch.int32)
    values = torch.randn(support.nnz, dtype=torch.float64, generator=generator)
    x = torch.randn(tokens, features, dtype=torch.float64, generator=generator)
    grad = torch.randn(tokens, rows, dtype=torch.float64, generator=generator)
    dense = dense_of(support, values)
    y = torch.zeros(tokens, rows, dtype=torch.float64)
    native.spmm_add_(x, support.crow_indices, support.col_indices, values, y)
    dx = torch.zeros(tokens, features, dtype=torch.float64)
    native.spmm_t_add_(grad, support.crow_indices, support.col_indices, values, dx)
    dv = native.entry_dots(grad, x, support.crow_indices, support.col_indices)
    torch.testing.assert_close(y, x @ dense.t(), **TOLERANCE[torch.float64])
    torch.testing.assert_close(dx, grad @ dense, **TOLERANCE[torch.float64])
    torch.testing.assert_close(dv, (grad.t() @ x)[rows_of(support), support.col_indices.to(torch.int64)])


@needs_native
@pytest.mark.parametrize("threads", [2, 3])
def test_dx_of_a_support_large_enough_to_be_transposed_in_parallel(threads):
    """Past 2**20 entries the kernel's transpose is made by several threads (native.cpp): rows split by
    entries, each column's rows still in order. A few rows are left empty."""
    rows, features, tokens = 1100, 1000, 5
    flat = uniform_flat_indices(rows * features, 2**20 + 20000, 0)
    flat = drop_rows(flat, features, torch.arange(rows) % 97 == 3)
    assert flat.numel() >= 2**20
    support = SparseSupport(flat, (rows, features), persistent=False)
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(support.nnz, dtype=torch.float64, generator=generator)
    grad = torch.randn(tokens, rows, dtype=torch.float64, generator=generator)
    out = torch.zeros(tokens, features, dtype=torch.float64)
    with num_threads(threads):
        native.spmm_t_add_(grad, support.crow_indices, support.col_indices, values, out)
    torch.testing.assert_close(out, grad @ dense_of(support, values), **TOLERANCE[torch.float64])


@needs_native
def test_the_kernels_refuse_other_index_types():
    support = SparseSupport(uniform_flat_indices(40 * 30, 90, 0), (40, 30), persistent=False)
    x, values = torch.randn(20, 30), torch.randn(90)
    with pytest.raises(ValueError, match="uint16 or int32 columns; got crow torch.int32, col torch.int64"):
        native.spmm_add_(x, support.crow_indices, support.col_indices.to(torch.int64), values, torch.zeros(20, 40))


@needs_native
def test_custom_ops_pass_opcheck():
    """Schemas, fake (shape-only) implementations and in-place mutation as declared: what compile relies on."""
    support = SparseSupport(uniform_flat_indices(40 * 30, 90, 0), (40, 30), persistent=False)
    x, grad, values = torch.randn(20, 30), torch.randn(20, 40), torch.randn(90)
    crow, col = support.crow_indices, support.col_indices
    for overwrite in (False, True):
        torch.library.opcheck(native.spmm_add_op, (x, crow, col, values, torch.zeros(20, 40), overwrite))
        torch.library.opcheck(native.spmm_t_add_op, (grad, crow, col, values, torch.zeros(20, 30), overwrite))
    torch.library.opcheck(native.entry_dots_op, (grad, x, crow, col))
    for inputs, right, transposed in ((x, torch.randn(3, 40), False), (grad, torch.randn(3, 30), True)):
        torch.library.opcheck(native.sparse_plus_mm_op, (inputs, crow, col, values, torch.randn(20, 3), right, 0.5, transposed))


@needs_native
def test_eager_calls_show_in_the_profiler_under_the_ops_names():
    """Eager calls skip the dispatcher, but a torch.profiler trace still names them."""
    support = SparseSupport(uniform_flat_indices(40 * 30, 90, 0), (40, 30), persistent=False)
    x, grad, values = torch.randn(20, 30), torch.randn(20, 40), torch.randn(90)
    with torch.profiler.profile() as profile:
        native.spmm_add_(x, support.crow_indices, support.col_indices, values, torch.zeros(20, 40))
        native.spmm_t_add_(grad, support.crow_indices, support.col_indices, values, torch.zeros(20, 30))
        native.entry_dots(grad, x, support.crow_indices, support.col_indices)
        native.sparse_plus_mm(x, support.crow_indices, support.col_indices, values, torch.ones(20, 1), torch.ones(1, 40))
    names = {event.key for event in profile.key_averages()}
    assert {"lsparam::spmm_add_", "lsparam::spmm_t_add_", "lsparam::entry_dots", "lsparam::sparse_plus_mm"} <= names


def _sltrain_forward_backward(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200))
    parametrize(model, SLTrainConfig(rank=8, density=0.05, sparse_backend="gather"))
    with torch.no_grad():  # B starts at zero (the paper's init), which would make dA zero on both routes
        model[0].parametrizations.weight.original0.normal_(0, 0.1)
    model.to(dtype)
    x = torch.randn(2, 70, 300, dtype=dtype, requires_grad=True)
    model(x).square().sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return x.grad, grads


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sltrain_gather_path_agrees_with_and_without_the_kernels(dtype):
    grad_x, grads = _sltrain_forward_backward(dtype)
    with native.disabled():  # the embedding_bag route
        grad_x_bag, grads_bag = _sltrain_forward_backward(dtype)
    torch.testing.assert_close(grad_x, grad_x_bag, **TOLERANCE[dtype])
    for name in grads:
        torch.testing.assert_close(grads[name], grads_bag[name], **TOLERANCE[dtype])


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """library() rebuilt under this test's environment, and forgotten again after it."""
    monkeypatch.setenv("LSPARAM_CACHE", str(tmp_path))
    native.library.cache_clear()
    yield
    native.library.cache_clear()


def test_a_missing_compiler_warns_once_and_falls_back(monkeypatch, fresh_library):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.warns(RuntimeWarning, match="native sparse kernels are not available.*/nonexistent/c"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available(torch.zeros(1))


def test_lsparam_native_0_switches_the_kernels_off_silently(monkeypatch, fresh_library):
    monkeypatch.setenv("LSPARAM_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None


def test_a_failed_build_names_the_compiler_and_leaves_no_file(tmp_path):
    with pytest.raises(native.NativeBuildError, match="cannot run the C\\+\\+ compiler '/nonexistent/c\\+\\+'"):
        native.build(tmp_path, "/nonexistent/c++")
    assert list(tmp_path.iterdir()) == []


@needs_native
def test_build_is_cached_by_source_and_compiler(tmp_path):
    first = native.build(tmp_path, "c++")
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path, "c++") == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


@needs_native
def test_vectors_as_wide_as_the_cpus_registers():
    """The kernels' vectors match the widest ISA torch detects on this CPU: a build with 64-byte vectors
    on an AVX2 CPU ran every product 5-8x slower (split registers, general permutes for the transposes)."""
    expected = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability())
    if expected is None:
        pytest.skip(f"no x86 vector ISA torch reports here ({torch.backends.cpu.get_cpu_capability()})")
    assert native.vector_bytes() == expected
