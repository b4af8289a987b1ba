"""lsparam: low-rank plus sparse weights for memory-efficient pretraining, through ``parametrize``.

>>> import torch, lsparam
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
>>> _ = lsparam.parametrize(model, lsparam.SLTrainConfig(rank=16, density=0.03))
>>> model(torch.randn(3, 64)).shape
torch.Size([3, 64])
"""

from lsparam.api import NoSavingWarning, merge, parametrize, structured_layers, summary
from lsparam.config import CoLAConfig, LOSTConfig, LowRankConfig, SLTrainConfig
from lsparam import optim
from lsparam.methods import register_method
from lsparam.methods.base import StructuredParametrization
from lsparam.targets import TargetNotFoundError
from lsparam.weight import NoDenseFormError, StructuredWeight

__version__ = "0.1.0"

__all__ = [
    "CoLAConfig",
    "LOSTConfig",
    "LowRankConfig",
    "NoDenseFormError",
    "NoSavingWarning",
    "SLTrainConfig",
    "StructuredParametrization",
    "StructuredWeight",
    "TargetNotFoundError",
    "merge",
    "optim",
    "parametrize",
    "register_method",
    "structured_layers",
    "summary",
]
