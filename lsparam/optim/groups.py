"""What an optimizer is given: parameter groups by role (weight decay), argument checks, and the
fused-kernel default. Used by :class:`lsparam.optim.LeanOptimizer`."""

from __future__ import annotations

import inspect
import math
import numbers

import torch
from torch import nn

STATE_BITS = (32, 8, 4)


def _no_decay(module: nn.Module) -> bool:
    """Normalisation layers keep their scales free of weight decay (biases are handled by name)."""
    name = type(module).__name__.lower()
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)) or "norm" in name


def param_groups_by_role(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed (weights, lsparam factors including 1-D sparse values) and not decayed
    (biases, normalisation scales). By role rather than by ``dim() >= 2``, which would spare SLTrain's
    1-D value vectors.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> [len(g["params"]) for g in param_groups_by_role(model, 0.1)]
        [1, 3]
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            (no_decay if name == "bias" or _no_decay(module) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def validate_arguments(optimizer_cls, lr, weight_decay, per_layer, state_bits, accumulation_steps, clip_norm) -> None:
    if not isinstance(per_layer, bool):  # "no" or 0.0 would otherwise count as true or false silently
        raise TypeError(f"per_layer must be True or False; got per_layer={per_layer!r}")
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass; got {optimizer_cls!r}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0; got {name}={value!r}")
    if state_bits not in STATE_BITS:
        raise ValueError(f"state_bits must be one of {list(STATE_BITS)}; got state_bits={state_bits!r}")
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, numbers.Integral) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an int >= 1; got accumulation_steps={accumulation_steps!r}")
    if clip_norm is not None and (isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real) or not clip_norm > 0):
        raise ValueError(f"clip_norm must be None or a positive number; got clip_norm={clip_norm!r}")


def listed_groups(params) -> list:
    """``params`` as a list, each group's ``"params"`` a list too: read more than once here (a generator,
    as ``module.parameters()`` is, would be empty the second time), and no group may be empty."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"params must be a model or an iterable of tensors or param-group dicts; got one "
                        f"{type(params).__name__} (wrap it in a list)")
    listed = []
    for index, item in enumerate(params):
        if isinstance(item, dict):
            group = item["params"]
            group = [group] if isinstance(group, torch.Tensor) else list(group)
            if not group:
                raise ValueError(f"param group {index} has no parameters; give each group at least one tensor")
            item = {**item, "params": group}
        listed.append(item)
    return listed


def with_fused_default(optimizer_cls, params: list, optimizer_kwargs: dict) -> dict:
    """``optimizer_kwargs`` plus ``fused=True`` where the class has a fused kernel for these parameters."""
    if "fused" in optimizer_kwargs or "foreach" in optimizer_kwargs or optimizer_kwargs.get("differentiable"):
        return optimizer_kwargs
    if "fused" not in inspect.signature(optimizer_cls.__init__).parameters:
        return optimizer_kwargs
    tensors = [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    supported = all(t.is_floating_point() and t.device.type in ("cpu", "cuda") and type(t) in (torch.Tensor, nn.Parameter)
                    for t in tensors)
    return {**optimizer_kwargs, "fused": True} if tensors and supported else optimizer_kwargs
