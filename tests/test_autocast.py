"""Mixed precision: a parametrized layer under ``torch.autocast`` computes as autocast computes ``F.linear``.

Every method and CPU sparse path, in ``nn.Linear`` (``F.linear``) and transformers' ``Conv1D``
(``torch.addmm`` on an ``in×out`` weight), with a bias: the output in bfloat16, the same function as the
model in float64 to bfloat16's precision, and gradients in float32 for the float32 factors, equal to the
float64 model's to that precision. (Mixing bfloat16 activations with float32 factors inside a method's
hand-written products used to fail with a dtype error.)
"""

import contextlib
import copy

import pytest
import torch
from torch import nn

import lsparam
from lsparam.sparse import native

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

CONFIGS = {
    "lowrank": lsparam.LowRankConfig(rank=6),
    "sltrain-gather": lsparam.SLTrainConfig(rank=6, density=0.1, sparse_backend="gather"),
    "sltrain-scatter": lsparam.SLTrainConfig(rank=6, density=0.1, sparse_backend="scatter"),
    "lost": lsparam.LOSTConfig(rank=6, channel_ratio=0.2),
    "lost-silu": lsparam.LOSTConfig(rank=6, channel_ratio=0.2, activation="silu"),
    "cola": lsparam.CoLAConfig(rank=6),
    "cola-checkpoint": lsparam.CoLAConfig(rank=6, checkpoint=True),
}
# bfloat16 keeps 8 bits of mantissa: compared as fractions of the largest reference value, 2% apart at most
BF16 = {"rtol": 0, "atol": 2e-2}


def model_of(layer_type: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(40, 24) if layer_type == "linear" else Conv1D(24, 40)
    model = lsparam.parametrize(nn.Sequential(layer), CONFIGS[name], target_modules=["0"])
    with torch.no_grad():  # every factor off its init (SLTrain's B = 0 would hide the low-rank path)
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    return model


# the gather path's second route: PyTorch's embedding_bag, what runs without the native kernels
ROUTES = [(name, "native") for name in CONFIGS] + [("sltrain-gather", "embedding_bag")]


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
@pytest.mark.parametrize(("name", "route"), ROUTES)
def test_autocast_runs_the_factorised_product_in_bfloat16(layer_type, name, route):
    model = model_of(layer_type, name)
    reference = copy.deepcopy(model).double()
    x = torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(1))

    expected = reference(x.double())
    expected.square().sum().backward()
    with native.disabled() if route == "embedding_bag" else contextlib.nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().sum().backward()

    assert y.dtype == torch.bfloat16  # as F.linear and addmm give under autocast
    scale = expected.abs().max()
    torch.testing.assert_close(y.double() / scale, expected / scale, **BF16)
    for (param_name, param), (_, reference_param) in zip(model.named_parameters(), reference.named_parameters()):
        assert param.grad.dtype == torch.float32, param_name
        scale = reference_param.grad.abs().max()
        torch.testing.assert_close(param.grad.double() / scale, reference_param.grad / scale, **BF16, msg=param_name)


def test_autocast_with_an_explicit_csr_path_on_cpu_names_the_dtype():
    model = lsparam.parametrize(nn.Sequential(nn.Linear(40, 24)), lsparam.SLTrainConfig(rank=6, density=0.1, sparse_backend="csr"))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="no CPU kernel for torch.bfloat16"):
        model(torch.randn(3, 40))
