"""The module types lsparam parametrizes, and how each lays out its weight.

- ``nn.Linear`` (and its subclasses): weight ``out×in``, consumed by ``F.linear``.
- transformers' ``Conv1D`` (GPT-2, GPT-J-style code): weight ``in×out``, consumed by ``torch.addmm``.
  Methods work on the ``out×in`` matrix; the layer's weight is its transpose.

Not supported: the ``out_proj`` of ``nn.MultiheadAttention`` (an ``nn.Linear`` whose weight
``F.multi_head_attention_forward`` consumes directly, not through ``F.linear``): a structured weight there
would be rebuilt densely on every forward, so ``"all-linear"`` skips it and naming it is refused.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn


def conv1d_type():
    """transformers' ``Conv1D`` class, or ``None`` when transformers is not loaded (then no model has one)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer lsparam can parametrize: an ``nn.Linear`` or a ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def attention_out_projections(model: nn.Module) -> dict[int, str]:
    """``{id(out_proj): name of its nn.MultiheadAttention}`` for every ``nn.MultiheadAttention`` in ``model``."""
    return {
        id(m.out_proj): name or "(model)"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and isinstance(getattr(m, "out_proj", None), nn.Module)
    }


@dataclass(frozen=True)
class LayerView:
    """What a method's ``build`` sees of a layer whose weight is stored ``in×out`` (``Conv1D``).

    ``out_features``, ``in_features`` and ``weight`` (the ``out×in`` transpose, a view) read as those of an
    ``nn.Linear``, so builds written for ``nn.Linear`` serve ``Conv1D`` too; ``module`` is the layer itself.
    """

    module: nn.Module
    out_features: int
    in_features: int
    weight: torch.Tensor


def build_view(layer: nn.Module):
    """The layer itself for an ``nn.Linear``; a :class:`LayerView` of ``out×in`` shape for a ``Conv1D``."""
    if is_conv1d(layer):
        in_features, out_features = layer.weight.shape
        return LayerView(layer, out_features, in_features, layer.weight.t())
    return layer
