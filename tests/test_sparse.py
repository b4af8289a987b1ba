"""The sparse paths against dense math: values, gradcheck, backend choice, supports."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lsparam
from lsparam.sparse import SparseSupport, resolve_backend, sparse_linear
from lsparam.sparse.matmul import semi_structured_available
from lsparam.sparse.support import two_four_flat_indices, uniform_flat_indices

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


@settings(max_examples=40, deadline=None)
@given(problem=sparse_problems(), backend=st.sampled_from(["gather", "csr", "scatter"]))
def test_sparse_linear_matches_dense_and_passes_gradcheck(problem, backend):
    support, values, x, dense = problem
    torch.testing.assert_close(sparse_linear(x, values, support, backend), x @ dense.T, rtol=0, atol=1e-12)
    inputs = (x.clone().requires_grad_(True), values.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda xi, v: sparse_linear(xi, v, support, backend), inputs)


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


def test_support_cache_follows_device_and_dtype_moves():
    layer = torch.nn.Linear(8, 8)
    lsparam.parametrize(layer, lsparam.SLTrainConfig(rank=2, density=0.25), target_modules=None)
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
