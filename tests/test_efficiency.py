"""No dense weight is kept for backward, and the forward pays the method's FLOPs, not dense ones."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import lsparam

OUT, IN, TOKENS, RANK = 96, 128, 16, 8

CONFIGS = {
    "lowrank": lsparam.LowRankConfig(rank=RANK),
    "sltrain-gather": lsparam.SLTrainConfig(rank=RANK, density=0.03, sparse_backend="gather"),
    "sltrain-csr": lsparam.SLTrainConfig(rank=RANK, density=0.03, sparse_backend="csr"),
    "sltrain-scatter": lsparam.SLTrainConfig(rank=RANK, density=0.03, sparse_backend="scatter"),
    "lost": lsparam.LOSTConfig(rank=RANK, channel_ratio=0.05),
    "lost-silu": lsparam.LOSTConfig(rank=RANK, channel_ratio=0.05, activation="silu"),
}


def make_layer(config):
    torch.manual_seed(0)
    layer = torch.nn.Linear(IN, OUT, bias=False)
    return lsparam.parametrize(layer, config, target_modules=None)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_dense_weight_is_saved_for_backward(name):
    layer = make_layer(CONFIGS[name])
    x = torch.randn(TOKENS, IN, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved, "autograd saved nothing: the test would be vacuous"
    assert (OUT, IN) not in saved and (IN, OUT) not in saved, saved
    assert max(torch.Size(s).numel() for s in saved) < OUT * IN
    y.sum().backward()  # and the backward still works from what was saved
    assert x.grad is not None


def count_flops(layer, x):
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["lowrank", "lost", "lost-silu"])
def test_dense_gemm_flops_are_the_factorised_ones(name):
    layer = make_layer(CONFIGS[name])
    x = torch.randn(TOKENS, IN, requires_grad=True)
    m = layer.parametrizations.weight[0].nnz() // OUT  # kept channels (0 for low-rank)
    per_token = RANK * (IN + OUT) + m * OUT  # multiply-adds of the forward
    # forward, then backward's grad-input and grad-weight GEMMs: 3 × 2 FLOPs per multiply-add
    assert count_flops(layer, x) == 3 * 2 * TOKENS * per_token
    dense = torch.nn.Linear(IN, OUT, bias=False)
    assert count_flops(dense, x) == 3 * 2 * TOKENS * IN * OUT


@pytest.mark.parametrize("name", ["sltrain-csr"])
def test_sltrain_csr_touches_the_full_weight_shape_only_in_sparse_layout(name):
    layer = make_layer(CONFIGS[name])
    x = torch.randn(TOKENS, IN, requires_grad=True)
    seen = []

    class RecordOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    seen.append((str(func), tuple(arg.shape), arg.layout))
            return func(*args, **(kwargs or {}))

    with RecordOps():
        layer(x).sum().backward()
    full = [(f, layout) for f, shape, layout in seen if shape in ((OUT, IN), (IN, OUT))]
    assert full, "the sparse path never ran"
    assert all(layout == torch.sparse_csr for _, layout in full), full
