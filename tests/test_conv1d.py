"""transformers' ``Conv1D`` (weight stored ``in×out``): the structured weight runs its factorised forward
under ``addmm`` and ``@``, and its gradients match autograd through the dense float64 formula."""

import pytest
import torch
from torch import nn

import lsparam

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

CONFIGS = {
    "lowrank": lsparam.LowRankConfig(rank=3),
    "sltrain": lsparam.SLTrainConfig(rank=3, density=0.2, init="dense"),
    "lost": lsparam.LOSTConfig(rank=3, channel_ratio=0.25, init="dense"),
    "lost-silu": lsparam.LOSTConfig(rank=3, channel_ratio=0.25, activation="silu"),
    "cola": lsparam.CoLAConfig(rank=3),
    "cola-m": lsparam.CoLAConfig(rank=3, activation="gelu", checkpoint=True),
}


def conv1d_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(Conv1D(10, 12)).double()  # nf = 10 outputs, nx = 12 inputs: weight 12x10
    nn.init.normal_(model[0].bias)
    return model


@pytest.mark.parametrize("name", ["lowrank", "sltrain", "lost"])
def test_products_on_the_transposed_weight_match_dense_math(name):
    model = lsparam.parametrize(conv1d_model(), CONFIGS[name])
    layer = model[0]
    weight = layer.weight
    assert tuple(weight.shape) == (12, 10)  # the module's own layout
    plist = layer.parametrizations.weight
    p = plist[0]
    assert (p.out_features, p.in_features, p.transposed) == (10, 12, True)
    dense = weight.dense().detach()  # in×out, from the method's formula
    torch.testing.assert_close(dense, p.dense(*(getattr(plist, f"original{i}") for i in range(len(p.factor_names)))).detach().t())
    x = torch.randn(7, 12, dtype=torch.float64)
    bias = layer.bias.detach()
    torch.testing.assert_close(torch.addmm(bias, x, weight), bias + x @ dense)
    torch.testing.assert_close(torch.addmm(bias, x, weight, beta=0.5, alpha=2.0), 0.5 * bias + 2.0 * x @ dense)
    torch.testing.assert_close(x @ weight, x @ dense)
    torch.testing.assert_close(torch.matmul(x[0], weight), x[0] @ dense)
    torch.testing.assert_close(model(x.reshape(1, 7, 12)), (bias + x @ dense).reshape(1, 7, 10))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_forward_never_builds_the_dense_matrix_and_gradients_match(name, monkeypatch):
    model = lsparam.parametrize(conv1d_model(), CONFIGS[name])
    plist = model[0].parametrizations.weight
    factors = [getattr(plist, f"original{i}") for i in range(len(plist[0].factor_names))]
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 10, dtype=torch.float64)

    def refuse(*args):
        raise AssertionError("the forward materialised the dense weight")

    with monkeypatch.context() as patch:
        patch.setattr(type(plist[0]), "dense", refuse)
        y = model(x)
    grads = torch.autograd.grad(y, (x, *factors), upstream)

    from lsparam.testing import reference_forward

    ref_x = x.detach().clone().requires_grad_(True)
    ref_factors = tuple(f.detach().clone().requires_grad_(True) for f in factors)
    y_ref = reference_forward(plist[0], ref_factors, ref_x) + model[0].bias
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref, (ref_x, *ref_factors), upstream)):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("name", ["lowrank", "sltrain", "lost"])
def test_merge_gives_back_a_conv1d_in_its_layout(name):
    original = conv1d_model()
    model = lsparam.parametrize(conv1d_model(), CONFIGS[name])
    x = torch.randn(4, 12, dtype=torch.float64)
    y = model(x)
    lsparam.merge(model)
    assert type(model[0]) is Conv1D and tuple(model[0].weight.shape) == (12, 10) and model[0].weight.is_contiguous()
    torch.testing.assert_close(model(x), y)
    # rank 3 of 10: not the original, but the closest such weight (init="dense"): the error is below 1
    assert not torch.allclose(model[0].weight, original[0].weight)


def test_full_rank_dense_init_reproduces_a_conv1d():
    original = conv1d_model()
    with pytest.warns(lsparam.NoSavingWarning):
        model = lsparam.parametrize(conv1d_model(), lsparam.LOSTConfig(rank=10, init="dense"))
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_decomposition_checker_accepts_conv1d_layers(name):
    from lsparam.testing import assert_decomposition

    assert_decomposition(lsparam.parametrize(conv1d_model(), CONFIGS[name]))
