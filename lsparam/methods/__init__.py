"""The method registry: config type -> (name, builder of a parametrization).

Built-in methods register here; users add their own with :func:`register_method`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lsparam.config import CoLAConfig, LOSTConfig, LowRankConfig, SLTrainConfig
from lsparam.methods import cola, lost, lowrank, sltrain
from lsparam.methods.base import StructuredParametrization


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    build: Callable  # (config, layer: nn.Linear, layer_name: str) -> StructuredParametrization


_REGISTRY: dict[type, Method] = {}


def register_method(name: str, config_cls: type, build: Callable) -> None:
    """Add a method: ``parametrize(model, config_cls(...))`` will then call ``build(config, layer, name)``.

    ``build`` returns a :class:`lsparam.StructuredParametrization` for one ``nn.Linear`` (raise
    ``ValueError`` there for a shape the config cannot serve). Names and config types are unique.

    Example:
        >>> import dataclasses, torch, lsparam
        >>> @dataclasses.dataclass
        ... class ScaledConfig:
        ...     factor: float = 2.0
        >>> class Scaled(lsparam.StructuredParametrization):
        ...     method = "scaled"
        ...     def init_factors(self, weight):
        ...         return (weight / self.config.factor,)
        ...     def dense(self, half):
        ...         return self.config.factor * half
        >>> lsparam.register_method("scaled", ScaledConfig,
        ...     lambda cfg, layer, name: Scaled(cfg, layer.out_features, layer.in_features, name))
        >>> layer = torch.nn.Linear(4, 3)
        >>> before = layer.weight.detach().clone()
        >>> _ = lsparam.parametrize(layer, ScaledConfig(), target_modules=None)
        >>> torch.allclose(layer.weight.dense(), before)
        True
        >>> lsparam.methods.unregister_method("scaled")
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string; got {name!r}")
    if not isinstance(config_cls, type):
        raise TypeError(f"config_cls must be a class; got {config_cls!r}")
    if not callable(build):
        raise TypeError(f"build must be callable (config, layer, name) -> parametrization; got {build!r}")
    taken = {m.name for m in _REGISTRY.values()}
    if name in taken or config_cls in _REGISTRY:
        raise ValueError(
            f"method {name!r} / config {config_cls.__name__} is already registered; known methods: {sorted(taken)}"
        )
    _REGISTRY[config_cls] = Method(name, config_cls, build)


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (built-in methods included)."""
    for config_cls, method in list(_REGISTRY.items()):
        if method.name == name:
            del _REGISTRY[config_cls]
            return
    raise ValueError(f"no method named {name!r}; known methods: {sorted(m.name for m in _REGISTRY.values())}")


def method_for(config) -> Method:
    """The registered method for a config instance, or a ``TypeError`` naming the known ones."""
    method = _REGISTRY.get(type(config))
    if method is None:
        known = ", ".join(f"{m.config_cls.__name__} ({m.name})" for m in _REGISTRY.values())
        raise TypeError(f"config must be an instance of a registered method config ({known}); got {config!r}")
    return method


def registered_methods() -> dict[str, Method]:
    return {m.name: m for m in _REGISTRY.values()}


register_method("lowrank", LowRankConfig, lowrank.build)
register_method("sltrain", SLTrainConfig, sltrain.build)
register_method("lost", LOSTConfig, lost.build)
register_method("cola", CoLAConfig, cola.build)

__all__ = ["StructuredParametrization", "register_method", "unregister_method", "method_for", "registered_methods"]
