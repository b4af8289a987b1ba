"""Which modules to touch, with PEFT's rules.

- ``"all-linear"``: every ``nn.Linear`` except the output embedding and any layer whose weight is tied
  to an input embedding.
- a string: a regular expression that must match the module's full qualified name (``re.fullmatch``).
- a list of strings: each matches a name exactly or as a dotted suffix (``"q_proj"`` matches
  ``"model.layers.0.self_attn.q_proj"``).
- ``None``: the model itself, when it is an ``nn.Linear`` (handy for a single layer).
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

ALL_LINEAR = "all-linear"


class TargetNotFoundError(ValueError):
    """``target_modules`` matched no module of the model."""


def _matches(rule, name: str) -> bool:
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    return any(name == key or name.endswith("." + key) for key in rule)


def _check_rule(arg: str, rule) -> None:
    if arg == "exclude_modules" and rule == ALL_LINEAR:
        raise ValueError("exclude_modules='all-linear' would exclude every layer; pass a regex or a list of names")
    if rule is None or isinstance(rule, str):
        if isinstance(rule, str) and rule != ALL_LINEAR:
            try:
                re.compile(rule)
            except re.error as exc:
                raise ValueError(f"{arg}={rule!r} is not a valid regular expression: {exc}") from None
        return
    if isinstance(rule, Iterable) and all(isinstance(k, str) for k in rule):
        return
    raise TypeError(f"{arg} must be 'all-linear', a regex string, or a list of module names; got {rule!r}")


def _tied_to_input_embedding(model: nn.Module) -> set[int]:
    """ids of weights shared with an ``nn.Embedding`` (tied output heads)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _output_embedding(model: nn.Module):
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def select_linear_layers(model: nn.Module, target_modules=ALL_LINEAR, exclude_modules=None) -> dict[str, nn.Linear]:
    """The ``{name: layer}`` that ``parametrize`` would touch, in model order.

    Raises ``TargetNotFoundError`` when nothing matches, ``TypeError`` when a matched module is not an
    ``nn.Linear``, and ``ValueError`` for an already-parametrized or tied layer.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> list(select_linear_layers(model))
        ['0', '2']
        >>> list(select_linear_layers(model, ["2"]))
        ['2']
    """
    _check_rule("target_modules", target_modules)
    _check_rule("exclude_modules", exclude_modules)
    if target_modules is None:
        if not isinstance(model, nn.Linear):
            raise TypeError(
                f"target_modules=None parametrizes the model itself, which must be an nn.Linear; "
                f"got {type(model).__name__}. Use 'all-linear', a regex or a list of names."
            )
        candidates = {"": model}
    elif target_modules == ALL_LINEAR:
        head = _output_embedding(model)
        tied = _tied_to_input_embedding(model)
        candidates = {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and name
            and (torch_parametrize.is_parametrized(m, "weight") or id(m.weight) not in tied)
        }
        if isinstance(model, nn.Linear) and not candidates:
            candidates = {"": model}
    else:
        candidates = {name: m for name, m in model.named_modules() if name and _matches(target_modules, name)}
    if exclude_modules is not None:
        candidates = {n: m for n, m in candidates.items() if not _matches(exclude_modules, n)}

    if not candidates:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise TargetNotFoundError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no module; "
            f"some nn.Linear names in this model: {linear_names[:6]}"
        )
    tied = _tied_to_input_embedding(model)
    for name, m in candidates.items():
        if not isinstance(m, nn.Linear):
            raise TypeError(
                f"target_modules={target_modules!r} matched {name!r}, a {type(m).__name__}, but only "
                f"nn.Linear layers can be parametrized; narrow the pattern or use exclude_modules"
            )
        if torch_parametrize.is_parametrized(m, "weight"):
            raise ValueError(
                f"layer {name!r} is already parametrized; call lsparam.merge(model) first, or exclude it"
            )
        if id(m.weight) in tied:
            raise ValueError(
                f"layer {name!r} shares its weight with an input embedding (tied weights); "
                f"parametrizing it would silently untie them. Exclude it or untie the weights first."
            )
    return candidates
