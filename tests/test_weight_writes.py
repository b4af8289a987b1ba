"""Writing to a parametrized layer's weight: an assignment factorises the new weight (or is refused where it
would be ignored), and an in-place write, which would change a dense copy and be lost, is refused."""

import numpy as np
import pytest
import torch

import lsparam

IN, OUT = 12, 10


def named_layer(config, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(IN, OUT, dtype=torch.float64)})
    lsparam.parametrize(model, config)
    return model["q_proj"]


def factors_of(layer):
    plist = layer.parametrizations.weight
    return [getattr(plist, f"original{i}").detach().clone() for i in range(len(plist[0].factor_names))]


WRITES = {
    "mul_": lambda w: w.mul_(2),
    "copy_": lambda w: w.copy_(torch.zeros(OUT, IN)),
    "+=": lambda w: w.__iadd__(1),
    "nn.init.normal_": lambda w: torch.nn.init.normal_(w),
    "nn.init.zeros_": lambda w: torch.nn.init.zeros_(w),
    "nn.init.kaiming_uniform_": lambda w: torch.nn.init.kaiming_uniform_(w),
    ".data.normal_()": lambda w: w.data.normal_(),
    ".data =": lambda w: setattr(w, "data", torch.zeros(OUT, IN)),
    "[0] =": lambda w: w.__setitem__(0, 1.0),
    "requires_grad_": lambda w: w.requires_grad_(False),
}
OP_NAMES = {"+=": "add_", "nn.init.normal_": "normal_", "nn.init.zeros_": "zero_", ".data.normal_()": "normal_",
            ".data =": "`.data =`", "nn.init.kaiming_uniform_": "kaiming_uniform_", "[0] =": r"`weight\[\.\.\.\] =`"}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("config", [lsparam.LowRankConfig(rank=3), lsparam.SLTrainConfig(rank=3, density=0.2),
                                    lsparam.CoLAConfig(rank=3)], ids=["lowrank", "sltrain", "cola"])
def test_an_in_place_write_to_the_weight_is_refused_and_changes_nothing(write, config):
    layer = named_layer(config)
    before, x = factors_of(layer), torch.randn(3, IN, dtype=torch.float64)
    y = layer(x).detach()
    op = OP_NAMES.get(write, write)
    with pytest.raises(RuntimeError, match=rf"{op}.* on the weight of layer 'q_proj' would be lost"):
        with torch.no_grad():
            WRITES[write](layer.weight)
    assert all(torch.equal(a, b) for a, b in zip(factors_of(layer), before))
    assert torch.equal(layer(x).detach(), y)


def test_requires_grad_names_the_way_to_freeze_the_layer():
    layer = named_layer(lsparam.LowRankConfig(rank=3))
    with pytest.raises(RuntimeError, match=r"layer\.parametrizations\.weight\.requires_grad_\(False\)"):
        layer.weight.requires_grad_(False)
    layer.parametrizations.weight.requires_grad_(False)
    assert not any(p.requires_grad for p in layer.parameters() if p is not layer.bias)


def test_reading_data_gives_the_same_matrix_detached():
    layer = named_layer(lsparam.SLTrainConfig(rank=3, density=0.2, init="dense"))
    data = layer.weight.data
    assert isinstance(data, lsparam.StructuredWeight) and all(not f.requires_grad for f in data.factors)
    torch.testing.assert_close(data.dense(), layer.weight.dense().detach(), rtol=0, atol=0)
    torch.testing.assert_close(data.norm(), layer.weight.dense().norm().detach(), rtol=0, atol=0)
    assert data.norm().grad_fn is None


def test_assigning_a_weight_to_a_low_rank_layer_gives_its_truncated_svd():
    layer = named_layer(lsparam.LowRankConfig(rank=3))
    W = torch.randn(OUT, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layer.weight = W
    U, sigma, Vh = np.linalg.svd(W.numpy(), full_matrices=False)
    best = (U[:, :3] * sigma[:3]) @ Vh[:3]  # Eckart-Young: the closest rank-3 matrix
    np.testing.assert_allclose(layer.weight.dense().detach().numpy(), best, atol=1e-10)
    assert layer.parametrizations.weight[0].init_error is None  # it measured the weight parametrize replaced


@pytest.mark.parametrize("config", [lsparam.LOSTConfig(rank=3, channel_ratio=0.25),
                                    lsparam.LOSTConfig(rank=3, channel_ratio=0.25, init="dense"),
                                    lsparam.SLTrainConfig(rank=3, density=0.2, init="dense")],
                         ids=["lost", "lost-dense", "sltrain-dense"])
def test_assigning_a_weight_factorises_it_as_parametrize_does(config):
    W = torch.randn(OUT, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layer = named_layer(config)
    layer.weight = W
    fresh = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(IN, OUT, dtype=torch.float64)})
    with torch.no_grad():
        fresh["q_proj"].weight.copy_(W)
    lsparam.parametrize(fresh, config)
    for a, b in zip(factors_of(layer), factors_of(fresh["q_proj"])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight.dense(), fresh["q_proj"].weight.dense(), rtol=0, atol=0)


@pytest.mark.parametrize("config, error, message", [
    (lsparam.SLTrainConfig(rank=3, density=0.2), ValueError, r"layer 'q_proj' would be ignored.*init='random'.*init='dense'"),
    (lsparam.CoLAConfig(rank=3), lsparam.NoDenseFormError, r"layer 'q_proj' \(cola\) has no dense form"),
    (lsparam.LOSTConfig(rank=3, activation="silu"), lsparam.NoDenseFormError, r"layer 'q_proj' \(lost\) has no dense form"),
], ids=["sltrain-random", "cola", "lost-silu"])
def test_an_assignment_that_would_not_hold_the_weight_is_refused(config, error, message):
    layer = named_layer(config)
    before = factors_of(layer)
    with pytest.raises(error, match=message):
        layer.weight = torch.randn(OUT, IN, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(factors_of(layer), before))


@pytest.mark.parametrize("config", [lsparam.LowRankConfig(rank=3), lsparam.LOSTConfig(rank=3, channel_ratio=0.25),
                                    lsparam.SLTrainConfig(rank=3, density=0.2, init="dense")],
                         ids=["lowrank", "lost", "sltrain-dense"])
@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_an_assignment_of_another_shape_or_dtype_is_refused_and_changes_nothing(config, bad):
    import copy

    layer = named_layer(config)
    x = torch.randn(3, IN, dtype=torch.float64)
    y, buffers = layer(x).detach(), {k: v.clone() for k, v in layer.named_buffers()}
    W = torch.randn(OUT + 2, IN) if bad == "shape" else torch.randn(OUT, IN, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"W must have the layer's shape \(10, 12\), dtype torch.float64"):
        layer.weight = W
    assert torch.equal(layer(x).detach(), y)
    assert all(torch.equal(v, buffers[k]) for k, v in layer.named_buffers())
    twin = copy.deepcopy(layer)  # a copy checks against its own factors
    with pytest.raises(ValueError, match="W must have"):
        twin.weight = W
    twin.weight = torch.randn(OUT, IN, dtype=torch.float64)
    assert torch.equal(layer(x).detach(), y)
