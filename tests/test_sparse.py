"""The sparse paths against dense math: values, gradcheck, backend choice, supports and their storage."""

import contextlib
import hashlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lsparam
from lsparam.sparse import SparseSupport, native, resolve_backend, sparse_linear
from lsparam.sparse.matmul import semi_structured_available
from lsparam.sparse.support import (
    derived_seed,
    two_four_flat_indices,
    uniform_flat_indices,
)

CUDA_2_4 = torch.cuda.is_available() and semi_structured_available(torch.device("cuda"), torch.bfloat16)


@st.composite
def sparse_problems(draw):
    out_features = draw(st.integers(1, 12))
    in_features = draw(st.integers(1, 12))
    nnz = draw(st.integers(1, out_features * in_features))
    seed = draw(st.integers(0, 2**31))
    flat = uniform_flat_indices(out_features * in_features, nnz, seed)
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(nnz, dtype=torch.float64, generator=generator)
    x = torch.randn(3, in_features, dtype=torch.float64, generator=generator)
    dense = torch.zeros(out_features * in_features, dtype=torch.float64)
    dense[flat] = values
    return SparseSupport(flat, (out_features, in_features), persistent=False), values, x, dense.view(out_features, in_features)


def route(backend: str):
    """``"gather"`` runs the native kernels where built; ``"embedding_bag"`` is the gather path without them."""
    return native.disabled() if backend == "embedding_bag" else contextlib.nullcontext()


@settings(max_examples=40, deadline=None)
@given(problem=sparse_problems(), backend=st.sampled_from(["gather", "embedding_bag", "csr", "scatter"]))
def test_sparse_linear_matches_dense_and_passes_gradcheck(problem, backend):
    support, values, x, dense = problem
    path = "gather" if backend == "embedding_bag" else backend
    with route(backend):
        torch.testing.assert_close(sparse_linear(x, values, support, path), x @ dense.T, rtol=0, atol=1e-12)
        inputs = (x.clone().requires_grad_(True), values.clone().requires_grad_(True))
        assert torch.autograd.gradcheck(lambda xi, v: sparse_linear(xi, v, support, path), inputs)


@settings(max_examples=10, deadline=None)
@given(
    in_features=st.sampled_from([32769, 40000, 65535, 65536, 65537]),
    tokens=st.integers(1, 3),
    backend=st.sampled_from(["gather", "embedding_bag", "csr"]),
    seed=st.integers(0, 2**31),
)
def test_wide_layers_forward_and_gradients_match_dense(in_features, tokens, backend, seed):
    """Columns past int16's range, the last uint16 one, and int32 columns past 65,536 wide, on each path;
    forward, dX and dV against float64 dense math (row 1 is left without entries)."""
    generator = torch.Generator().manual_seed(seed)
    flat = uniform_flat_indices(3 * in_features, 60, seed)
    flat = torch.cat([flat[flat // in_features != 1], torch.tensor([in_features - 1, 3 * in_features - 1])]).unique()
    support = SparseSupport(flat, (3, in_features), persistent=False)
    values = torch.randn(support.nnz, dtype=torch.float64, generator=generator, requires_grad=True)
    x = torch.randn(tokens, in_features, dtype=torch.float64, generator=generator, requires_grad=True)
    grad = torch.randn(tokens, 3, dtype=torch.float64, generator=generator)
    dense = torch.zeros(3 * in_features, dtype=torch.float64).index_put((flat,), values).view(3, in_features)
    expected = x @ dense.T
    expected_dx, expected_dv = torch.autograd.grad(expected, (x, values), grad)
    with route(backend):
        y = sparse_linear(x, values, support, "gather" if backend == "embedding_bag" else backend)
        dx, dv = torch.autograd.grad(y, (x, values), grad)
    for got, want in ((y, expected), (dx, expected_dx), (dv, expected_dv)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(problem=sparse_problems())
def test_transposed_csr_is_the_transpose(problem):
    support, values, _, dense = problem
    torch.testing.assert_close(support.csr_transposed(values).to_dense(), dense.T, rtol=0, atol=0)
    torch.testing.assert_close(support.to_dense(values), dense, rtol=0, atol=0)


def test_sparse_linear_handles_batched_3d_input():
    support = SparseSupport(uniform_flat_indices(6 * 5, 9, 0), (6, 5), persistent=False)
    values = torch.randn(9, dtype=torch.float64)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    expected = x @ support.to_dense(values).T
    for backend in ("gather", "csr", "scatter"):
        torch.testing.assert_close(sparse_linear(x, values, support, backend), expected)


def test_auto_backend_choice():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32, 0.03) == "gather"
    assert resolve_backend("auto", cpu, torch.float32, 0.5) == "scatter"
    assert resolve_backend("auto", cpu, torch.bfloat16, 0.03) == "gather"
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16, 0.03) == "csr"
    assert resolve_backend("scatter", cpu, torch.bfloat16, 0.03) == "scatter"
    with pytest.raises(ValueError, match="csr.*bfloat16"):
        resolve_backend("csr", cpu, torch.bfloat16, 0.03)
    with pytest.raises(ValueError, match="semi-structured.*device=cpu"):
        resolve_backend("semi-structured", cpu, torch.float16, 0.5)


def test_two_four_support_keeps_two_of_every_four():
    flat = two_four_flat_indices(8, 16, seed=3)
    mask = torch.zeros(8 * 16, dtype=torch.int64)
    mask[flat] = 1
    assert flat.numel() == 8 * 16 // 2
    assert (mask.view(8, 4, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="in_features divisible by 4; got in_features=6"):
        two_four_flat_indices(8, 6, seed=0)


def test_uniform_support_is_deterministic_sorted_and_unique():
    a = uniform_flat_indices(1000, 100, seed=7)
    assert torch.equal(a, uniform_flat_indices(1000, 100, seed=7))
    assert (a[1:] > a[:-1]).all() and a.min() >= 0 and a.max() < 1000


def independent_index_bytes(out_features: int, in_features: int, nnz: int, transposed: bool) -> int:
    """What the support should hold: 2-byte columns (4 past 65,536 wide), int32 row pointers, and where the
    path keeps one (CSR), the int32 transpose (row pointers, rows and the permutation)."""
    column_bytes = 2 if in_features <= 65536 else 4
    total = nnz * column_bytes + 4 * (out_features + 1)
    return total + (4 * (in_features + 1) + 8 * nnz if transposed else 0)


@pytest.mark.parametrize(
    ("backend", "dtype", "native_on", "transposed"),
    [
        ("gather", torch.float32, True, False),  # the native kernels: nothing beside the CSR arrays
        ("gather", torch.float64, True, False),
        ("auto", torch.float32, True, False),
        ("gather", torch.float32, False, False),  # embedding_bag: its transpose is made for each backward
        ("gather", torch.bfloat16, True, False),  # no bf16 kernel: embedding_bag
        ("csr", torch.float32, True, True),  # keeps its transpose
        ("scatter", torch.float32, True, False),
    ],
)
@pytest.mark.parametrize("shape", [(48, 64), (5, 70000)])
def test_index_storage_is_counted_from_the_tensors_held(backend, dtype, native_on, transposed, shape):
    """After a forward and backward, the support's tensors, index_bytes and an independent count agree."""
    if native_on and dtype in (torch.float32, torch.float64) and not native.available(torch.zeros(1)):
        pytest.skip("the native kernels could not be built")
    out_features, in_features = shape
    density = 0.05 if in_features < 1000 else 0.0002
    layer = torch.nn.Linear(in_features, out_features, dtype=dtype)
    config = lsparam.SLTrainConfig(rank=2, density=density, sparse_backend=backend)
    lsparam.parametrize(layer, config, target_modules=None)
    p = layer.parametrizations.weight[0]
    nnz = math.floor(density * out_features * in_features)
    assert p.support.nnz == nnz
    assert p.support.crow_indices.dtype == torch.int32
    assert p.support.col_indices.dtype == (torch.uint16 if in_features <= 65536 else torch.int32)
    with contextlib.nullcontext() if native_on else native.disabled():
        layer(torch.randn(3, in_features, dtype=dtype, requires_grad=True)).float().sum().backward()
        held = sum(t.numel() * t.element_size() for t in p.support.index_tensors())
        expected = independent_index_bytes(out_features, in_features, nnz, transposed)
        assert held == expected
        assert p.index_bytes("cpu", dtype) == expected


def old_csr_arrays(flat: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSR arrays as lsparam held and saved them before 16-bit columns: int32 both."""
    rows = flat // shape[1]
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    return crow.to(torch.int32), (flat % shape[1]).to(torch.int32)


def test_random_supports_are_the_ones_earlier_versions_drew():
    """Regenerated from the seed, the entries are those of checkpoints saved before 16-bit columns: the
    digests were taken from the int32 supports of lsparam at commit 6563faa, and the draw is rebuilt here
    the way that code drew it (randperm of the positions from a per-layer seed, the first nnz, sorted)."""
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(300, 7))
    lsparam.parametrize(model, lsparam.SLTrainConfig(rank=4, density=0.05, seed=0))
    digests = {"0": "b1b2fa3dae6e5df1", "1": "f0f550242e80d082"}
    for name, layer in zip("01", model):
        p = layer.parametrizations.weight[0]
        out_features, in_features = p.support.shape
        flat = p.support.flat_indices()
        assert hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16] == digests[name]
        generator = torch.Generator().manual_seed(derived_seed(0, name, out_features, in_features, "support"))
        drawn = torch.randperm(out_features * in_features, generator=generator)[: p.support.nnz].sort().values
        crow, col = old_csr_arrays(drawn, p.support.shape)
        assert torch.equal(p.support.crow_indices, crow)
        assert torch.equal(p.support.col_indices.to(torch.int32), col)


@pytest.mark.parametrize("assign", [False, True])
def test_a_state_dict_with_int32_columns_loads_exactly(assign):
    """A stored support (init='dense') saved with int32 columns, as before 16-bit columns, loads into 16-bit
    columns with the same entries and gives the same output; columns past 32,767 included. Earlier versions
    load the new state_dict as well: its uint16 columns copy exactly into their int32 buffer."""
    torch.manual_seed(0)
    in_features, config = 40000, lsparam.SLTrainConfig(rank=2, density=0.01, init="dense")
    source = lsparam.parametrize(torch.nn.Sequential(torch.nn.Linear(in_features, 3)), config)
    state = source.state_dict()
    key = "0.parametrizations.weight.0.support."
    flat = source[0].parametrizations.weight[0].support.flat_indices()
    assert flat.remainder(in_features).max() > 32767
    old_state = dict(state)
    old_state[key + "crow_indices"], old_state[key + "col_indices"] = old_csr_arrays(flat, (3, in_features))

    torch.manual_seed(1)  # other weights: another support until the load
    target = lsparam.parametrize(torch.nn.Sequential(torch.nn.Linear(in_features, 3)), config)
    assert not torch.equal(target[0].parametrizations.weight[0].support.flat_indices(), flat)
    target.load_state_dict(old_state, assign=assign)
    support = target[0].parametrizations.weight[0].support
    assert support.col_indices.dtype == torch.uint16 and support.crow_indices.dtype == torch.int32
    assert torch.equal(support.flat_indices(), flat)
    x = torch.randn(4, in_features)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    B, A, values = (t.double() for t in source[0].weight.factors)
    reference = torch.zeros(3 * in_features, dtype=torch.float64).index_put((flat,), values).view(3, in_features)
    reference += source[0].parametrizations.weight[0].scale * B @ A
    expected = x.double() @ reference.T + source[0].bias.double()
    torch.testing.assert_close(target(x).double(), expected, rtol=1e-4, atol=1e-5)  # float32 sums of 40000

    assert state[key + "col_indices"].dtype == torch.uint16
    widened = torch.zeros(flat.numel(), dtype=torch.int32).copy_(state[key + "col_indices"])
    assert torch.equal(widened, old_state[key + "col_indices"])


def test_support_cache_follows_device_and_dtype_moves():
    layer = torch.nn.Linear(8, 8)
    config = lsparam.SLTrainConfig(rank=2, density=0.25, sparse_backend="csr")
    lsparam.parametrize(layer, config, target_modules=None)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()  # builds the transposed CSR cache
    layer.to(torch.float64)
    x64 = x.detach().double().requires_grad_(True)
    layer(x64).sum().backward()
    dense = layer.weight.dense().detach()
    torch.testing.assert_close(x64.grad, dense.sum(0).expand(3, 8))


@pytest.mark.skipif(not CUDA_2_4, reason="2:4 semi-structured sparsity needs CUDA sm80+")
def test_semi_structured_backend_matches_scatter_on_cuda():
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 64, device="cuda", dtype=torch.bfloat16)
    lsparam.parametrize(
        layer, lsparam.SLTrainConfig(rank=16, density=0.5, sparse_backend="semi-structured"), target_modules=None
    )
    p = layer.parametrizations.weight[0]
    mask = torch.zeros(64 * 128, dtype=torch.int64, device="cuda")
    mask[p.support.flat_indices()] = 1
    assert (mask.view(64, 32, 4).sum(-1) == 2).all()
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y_ref = x @ layer.weight.dense().T + layer.bias
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    y_ref.float().square().sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["gather", "csr", "scatter"])
def test_sltrain_on_cuda_matches_cpu(backend):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 64, dtype=torch.float64)
    lsparam.parametrize(layer, lsparam.SLTrainConfig(rank=8, density=0.05, sparse_backend=backend), target_modules=None)
    x = torch.randn(5, 96, dtype=torch.float64)
    y_cpu = layer(x)
    layer.cuda()
    torch.testing.assert_close(layer(x.cuda()).cpu(), y_cpu)


def _sltrain_pair(backend):
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 48), torch.nn.ReLU(), torch.nn.Linear(48, 40))
        return lsparam.parametrize(model, lsparam.SLTrainConfig(rank=4, density=0.1, sparse_backend=backend),
                                   target_modules=["0", "2"])

    return build


@pytest.mark.parametrize("backend", ["gather", "csr", "scatter"])
@pytest.mark.parametrize("route", ["meta copy", "built on meta"])
def test_a_model_materialised_from_meta_gets_its_drawn_support_back_on_load(backend, route):
    # FSDP's and accelerate's low-memory init: the model on the meta device, to_empty, then load_state_dict.
    # The drawn support is not in the state_dict, and to_empty leaves its buffers uninitialised.
    build = _sltrain_pair(backend)
    source = build()
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    expected = source(x)
    if route == "meta copy":
        model = __import__("copy").deepcopy(source).to("meta")
    else:
        with torch.device("meta"):
            model = build()
    model.to_empty(device="cpu")
    for layer in (model[0], model[2]):  # what uninitialised memory may hold
        support = layer.parametrizations.weight[0].support
        support.crow_indices.fill_(1 << 20)
        support.col_indices.fill_(7)
        assert not support.holds_valid_csr()
    model.load_state_dict(source.state_dict())
    for mine, theirs in ((model[0], source[0]), (model[2], source[2])):
        a, b = mine.parametrizations.weight[0].support, theirs.parametrizations.weight[0].support
        assert torch.equal(a.crow_indices, b.crow_indices) and torch.equal(a.col_indices, b.col_indices)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
