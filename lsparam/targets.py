"""Which modules to touch, with PEFT's rules.

- ``"all-linear"``: every ``nn.Linear`` and transformers ``Conv1D`` except the output embedding, any layer
  whose weight is tied to an input embedding, and the ``out_proj`` of ``nn.MultiheadAttention`` (whose
  weight is not consumed through ``F.linear``; see :mod:`lsparam.layer_types`).
- a string: a regular expression that must match the module's full qualified name (``re.fullmatch``).
- a list of strings: each matches a name exactly or as a dotted suffix (``"q_proj"`` matches
  ``"model.layers.0.self_attn.q_proj"``); an entry that matches no module is an error.
- a callable ``filter_fn(module, name) -> bool`` (torchao's convention), asked about every ``nn.Linear``
  and ``Conv1D`` of the model.
- ``None``: the model itself, when it is an ``nn.Linear`` (handy for a single layer).
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from lsparam.layer_types import attention_out_projections, is_linear_layer

ALL_LINEAR = "all-linear"


class TargetNotFoundError(ValueError):
    """``target_modules`` (or an entry of it) matched no module of the model."""


def _matches(rule, name: str, module: nn.Module = None) -> bool:
    if callable(rule):
        return bool(rule(module, name))
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    return any(_entry_matches(key, name) for key in rule)


def _entry_matches(key: str, name: str) -> bool:
    return name == key or name.endswith("." + key)


def _check_rule(arg: str, rule) -> None:
    if arg == "exclude_modules" and rule == ALL_LINEAR:
        raise ValueError("exclude_modules='all-linear' would exclude every layer; pass a regex or a list of names")
    if rule is None or callable(rule):
        return
    if isinstance(rule, str):
        if rule != ALL_LINEAR:
            try:
                re.compile(rule)
            except re.error as exc:
                raise ValueError(f"{arg}={rule!r} is not a valid regular expression: {exc}") from None
        return
    if isinstance(rule, Iterable) and not isinstance(rule, (bytes, dict)) and all(isinstance(k, str) for k in rule):
        return
    raise TypeError(
        f"{arg} must be 'all-linear', a regex string, a list of module names or a callable "
        f"(module, name) -> bool; got {rule!r}"
    )


def _check_list_entries(arg: str, rule, named: list[tuple[str, nn.Module]]) -> None:
    """Every entry of a list rule, and an exclude_modules regex, must name some module: a typo is an error,
    not a silent no-op."""
    if rule is None or callable(rule) or rule == ALL_LINEAR:
        return
    if isinstance(rule, str):
        if arg == "exclude_modules" and not any(_matches(rule, name) for name, _ in named):
            raise TargetNotFoundError(
                f"exclude_modules={rule!r} matched no module (a regex must match a whole module name, as "
                f"re.fullmatch does: e.g. r'.*layers\\.0\\..*'); some module names in this model: "
                f"{[name for name, m in named if is_linear_layer(m)][:6]}"
            )
        return
    unmatched = [key for key in rule if not any(_entry_matches(key, name) for name, _ in named)]
    if unmatched:
        linear_names = [name for name, m in named if is_linear_layer(m)]
        raise TargetNotFoundError(
            f"{arg}={list(rule)!r}: {unmatched!r} matched no module (an entry matches a full module name or a "
            f"dotted suffix of one); some nn.Linear / Conv1D names in this model: {linear_names[:6]}"
        )


def _tied_to_input_embedding(model: nn.Module) -> set[int]:
    """ids of weights shared with an ``nn.Embedding`` (tied output heads)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _output_embedding(model: nn.Module):
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def select_linear_layers(model: nn.Module, target_modules=ALL_LINEAR, exclude_modules=None) -> dict[str, nn.Module]:
    """The ``{name: layer}`` that ``parametrize`` would touch, in model order.

    Raises ``TargetNotFoundError`` when nothing matches or a list entry matches no module, ``TypeError``
    when a matched module is not an ``nn.Linear`` or ``Conv1D``, and ``ValueError`` for an
    already-parametrized or tied layer, or the ``out_proj`` of an ``nn.MultiheadAttention``.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> list(select_linear_layers(model))
        ['0', '2']
        >>> list(select_linear_layers(model, ["2"]))
        ['2']
        >>> list(select_linear_layers(model, lambda module, name: module.out_features == 2))
        ['2']
    """
    _check_rule("target_modules", target_modules)
    _check_rule("exclude_modules", exclude_modules)
    # the factors' own modules (``x.parametrizations.weight.0``) are not layers of the model
    named = [(name, m) for name, m in model.named_modules() if name and "parametrizations" not in name.split(".")]
    _check_list_entries("target_modules", target_modules, named)
    _check_list_entries("exclude_modules", exclude_modules, named)
    attention_outputs = attention_out_projections(model)
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
            for name, m in named
            if is_linear_layer(m) and m is not head and id(m) not in attention_outputs
            and (torch_parametrize.is_parametrized(m, "weight") or id(m.weight) not in tied)
        }
        if isinstance(model, nn.Linear) and not candidates:
            candidates = {"": model}
    elif callable(target_modules):
        candidates = {name: m for name, m in named if is_linear_layer(m) and _matches(target_modules, name, m)}
    else:
        candidates = {name: m for name, m in named if _matches(target_modules, name)}
    if exclude_modules is not None:
        candidates = {n: m for n, m in candidates.items() if not _matches(exclude_modules, n, m)}

    if not candidates:
        linear_names = [n for n, m in named if is_linear_layer(m)]
        raise TargetNotFoundError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no module; "
            f"some nn.Linear / Conv1D names in this model: {linear_names[:6]}"
        )
    tied = _tied_to_input_embedding(model)
    for name, m in candidates.items():
        if not is_linear_layer(m):
            raise TypeError(
                f"target_modules={target_modules!r} matched {name!r}, a {type(m).__name__}, but only "
                f"nn.Linear and transformers Conv1D layers can be parametrized; narrow the pattern or use "
                f"exclude_modules"
            )
        if id(m) in attention_outputs:
            raise ValueError(
                f"layer {name!r} is the out_proj of the nn.MultiheadAttention {attention_outputs[id(m)]!r}, whose "
                f"forward reads the weight directly (F.multi_head_attention_forward), not through F.linear: a "
                f"structured weight there would be rebuilt as a dense matrix on every forward. Exclude it "
                f"('all-linear' already does)."
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


def configs_per_layer(config, layers: dict[str, nn.Module]) -> dict[str, object]:
    """``{name: config}`` for the selected ``layers``: one config for all, or per pattern of a dict.

    A dict maps regular expressions, searched in each layer's full name (``re.search``), to configs:
    ``{r"\\.mlp\\.": SLTrainConfig(), r"\\.self_attn\\.": LOSTConfig()}``. A layer matched by no pattern
    stays dense; a layer matched by two patterns, and a pattern that matches no selected layer, are errors.

    Example:
        >>> import torch, lsparam
        >>> layers = {"attn.q": torch.nn.Linear(4, 4), "mlp.up": torch.nn.Linear(4, 8), "head": torch.nn.Linear(4, 2)}
        >>> routed = configs_per_layer({r"^attn\\.": lsparam.LowRankConfig(2), r"^mlp\\.": lsparam.LOSTConfig(2)}, layers)
        >>> {name: type(c).__name__ for name, c in routed.items()}
        {'attn.q': 'LowRankConfig', 'mlp.up': 'LOSTConfig'}
    """
    if not isinstance(config, dict):
        return {name: config for name in layers}
    if not config:
        raise ValueError("config is an empty dict; map at least one pattern to a config, or pass one config")
    patterns = {}
    for key in config:
        if not isinstance(key, str):
            raise TypeError(f"the keys of a config dict are regex strings; got {key!r} of type {type(key).__name__}")
        try:
            patterns[key] = re.compile(key)
        except re.error as exc:
            raise ValueError(f"config key {key!r} is not a valid regular expression: {exc}") from None
    routed, used = {}, set()
    for name in layers:
        hits = [key for key, pattern in patterns.items() if pattern.search(name)]
        if len(hits) > 1:
            raise ValueError(
                f"layer {name!r} matches config patterns {hits[0]!r} and {hits[1]!r}; each layer may match one "
                f"pattern: make them exclusive"
            )
        if hits:
            routed[name] = config[hits[0]]
            used.add(hits[0])
    unused = [key for key in config if key not in used]
    if unused:
        raise TargetNotFoundError(
            f"config patterns {unused!r} match no selected layer (patterns are searched in full layer names, "
            f"re.search); selected layers include {list(layers)[:6]}"
        )
    return routed
