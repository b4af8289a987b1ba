"""The verbs: ``parametrize`` a model, ``merge`` it back to dense, ``summary`` of what changed."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize
from tqdm.auto import tqdm

from lsparam.config import default_config
from lsparam.methods import method_for
from lsparam.methods.base import StructuredParametrization, check_specs_before_loading, remove_structured_weight
from lsparam.layer_types import build_view, is_conv1d
from lsparam.sparse.matmul import is_shape_only
from lsparam.targets import ALL_LINEAR, configs_per_layer, select_linear_layers
from lsparam.weight import NoDenseFormError

# Show a progress bar when initialisation may take a while (SVDs of many layers).
_PROGRESS_MIN_LAYERS = 16


class NoSavingWarning(UserWarning):
    """A parametrized layer holds at least as many parameters as the dense weight it replaced."""


def parametrize(model: nn.Module, config=None, *, target_modules=ALL_LINEAR, exclude_modules=None, progress=None):
    """Turn the model's linear weights into structured ones, in place; returns the model.

    Args:
        model: any ``nn.Module`` (or a single ``nn.Linear`` with ``target_modules=None``).
        config: ``SLTrainConfig``, ``LOSTConfig``, ``CoLAConfig``, ``LowRankConfig`` or a registered config;
            ``None`` means ``LOSTConfig(activation="silu")`` (rank 0.25 of each layer, 5% of channels,
            γ = 0.5): the quality study's winner; use ``LOSTConfig()`` where you need ``merge``. A dict
            ``{regex: config}`` gives each selected layer the config whose pattern its full name contains
            (``re.search``); layers that match no pattern stay dense, two matching patterns are an error.
        target_modules: ``"all-linear"`` (default: every ``nn.Linear`` and transformers ``Conv1D`` but the
            output head, tied layers and ``nn.MultiheadAttention.out_proj``), a regex that must match a full
            module name, a list of names matched exactly or as dotted suffixes (each must match a module),
            or a callable ``(module, name) -> bool`` asked about every linear layer.
        exclude_modules: same forms; matching modules are left dense.
        progress: show a progress bar (default: when there are many layers).

    Everything is validated before anything is registered: on error the model is untouched. To convert a
    trained model for continued pretraining, use a config with ``init="dense"``: each layer then starts
    from the closest weight of its structure, and :func:`summary` shows what that cost per layer. A
    ``NoSavingWarning`` names the layers that would hold at least as many parameters as their dense weight.

    Example:
        >>> import torch, lsparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 64))
        >>> _ = lsparam.parametrize(model, lsparam.SLTrainConfig(rank=8, density=0.05))
        >>> isinstance(model[0], torch.nn.Linear), model(torch.randn(2, 64)).shape
        (True, torch.Size([2, 64]))
        >>> sum(p.numel() for p in model.parameters())  # r(in+out) + nnz per layer, plus biases
        1836
        >>> mixed = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 64))
        >>> _ = lsparam.parametrize(mixed, {"^0$": lsparam.LowRankConfig(rank=8), "^2$": lsparam.LOSTConfig(rank=8)})
        >>> [p.method for _, p in lsparam.structured_layers(mixed).values()]
        ['lowrank', 'lost']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    config = default_config() if config is None else config
    for key, value in config.items() if isinstance(config, dict) else [(None, config)]:
        try:
            method_for(value)  # an unknown config is refused before the model is looked at
        except TypeError as error:
            raise TypeError(f"config[{key!r}]: {error}" if key is not None else str(error)) from None
    layers = select_linear_layers(model, target_modules, exclude_modules)
    routed = configs_per_layer(config, layers)

    # Build every parametrization first: per-layer errors (rank too large...) leave the model untouched.
    built = {}
    for name, layer_config in routed.items():
        method = method_for(layer_config)
        parametrization = method.build(layer_config, build_view(layers[name]), name)
        if not isinstance(parametrization, StructuredParametrization):
            raise TypeError(
                f"build for method {method.name!r} must return a StructuredParametrization; "
                f"got {type(parametrization).__name__}"
            )
        parametrization.transposed = is_conv1d(layers[name])  # Conv1D stores its weight in×out
        built[name] = parametrization

    show = len(built) >= _PROGRESS_MIN_LAYERS if progress is None else progress
    methods = sorted({p.method for p in built.values()})
    registered = []  # (layer, its dense weight Parameter) for a rollback
    try:
        for name, parametrization in tqdm(built.items(), desc=f"lsparam {'+'.join(methods)}", disable=not show):
            layer = layers[name]
            dense = layer.weight
            parametrization.to(device=dense.device)
            # unsafe=True: the originals are the factors, whose shapes differ from the weight's.
            torch_parametrize.register_parametrization(layer, "weight", parametrization, unsafe=True)
            parametrization.bind(layer.parametrizations.weight)
            registered.append((layer, dense))
            parametrization.init_error = _relative_error(layer.weight, dense)
    except BaseException:
        for layer, dense in registered:  # a failure never leaves a half-converted model
            remove_structured_weight(layer, dense)
        raise
    _check_loads_through(model, routed)
    _warn_about_layers_that_save_nothing(built, layers)
    return model


def _check_loads_through(model: nn.Module, layer_names) -> None:
    """Put the load check on ``model`` and on every module between it and a parametrized layer (each once),
    so that ``load_state_dict`` through any of them is checked before anything is copied."""
    paths = {""}
    for name in layer_names:
        parts = name.split(".") if name else []
        paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    for path in sorted(paths):
        module = model.get_submodule(path) if path else model
        if not module.__dict__.get("_lsparam_load_check", False):
            module.register_load_state_dict_pre_hook(check_specs_before_loading)
            module.__dict__["_lsparam_load_check"] = True
    model.__dict__["_lsparam_load_root"] = True  # checks a load that starts above it, too


def _relative_error(weight, dense: torch.Tensor) -> float | None:
    """``‖W_start − W‖_F / ‖W‖_F`` for a layer's new structured ``weight`` against its old ``dense`` one."""
    if not weight.parametrization.has_dense_form or is_shape_only(dense):
        return None
    with torch.no_grad():
        reference = dense.detach().double()
        norm = torch.linalg.matrix_norm(reference).item()
        if norm == 0.0:
            return None
        return torch.linalg.matrix_norm(weight.dense().double() - reference).item() / norm


def _warn_about_layers_that_save_nothing(built: dict, layers: dict) -> None:
    wasteful = []
    for name, parametrization in built.items():
        held = sum(p.numel() for p in layers[name].parametrizations.weight.parameters())
        dense = parametrization.out_features * parametrization.in_features
        if held >= dense:
            wasteful.append(f"{name or '(model)'} ({parametrization.method}, {held:,} >= {dense:,})")
    if wasteful:
        warnings.warn(
            f"{len(wasteful)} layer(s) hold at least as many parameters as their dense weight: "
            f"{', '.join(wasteful[:5])}{', ...' if len(wasteful) > 5 else ''}. A rank-r factor pair saves "
            f"parameters only while r < in*out / (in + out), less what a sparse part adds; lower the rank "
            f"(or density / channel_ratio), or leave these layers dense with exclude_modules.",
            NoSavingWarning,
            stacklevel=3,
        )


def structured_layers(model: nn.Module) -> dict[str, tuple[nn.Module, StructuredParametrization]]:
    """``{name: (layer, parametrization)}`` for every weight lsparam parametrized, in model order."""
    found = {}
    for name, module in model.named_modules():
        if torch_parametrize.is_parametrized(module, "weight"):
            first = module.parametrizations.weight[0]
            if isinstance(first, StructuredParametrization):
                found[name] = (module, first)
    return found


def require_dense_form(layers: dict, consequence: str) -> None:
    """Raise ``NoDenseFormError`` naming the first of ``layers`` (from :func:`structured_layers`) that has
    no dense form (SiLU-LOST, CoLA) and why; ``consequence`` finishes the message."""
    for name, (_, parametrization) in layers.items():
        if not parametrization.has_dense_form:
            reason = f" ({parametrization.no_dense_reason})" if parametrization.no_dense_reason else ""
            raise NoDenseFormError(
                f"layer {name or '(model)'!r} ({parametrization.method}, {parametrization.config}) has no dense "
                f"form{reason} and {consequence}"
            )


def merge(model: nn.Module) -> nn.Module:
    """Replace every structured weight by its dense matrix: plain ``nn.Linear`` (or ``Conv1D``) layers
    again, each weight in its module's own layout; in place.

    Refuses (``NoDenseFormError``, model untouched) when a layer has no dense form (SiLU-LOST, CoLA).
    ``merge(copy.deepcopy(model))`` gives a dense copy and leaves ``model`` parametrized and training.

    Example:
        >>> import torch, lsparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32))
        >>> _ = lsparam.parametrize(model, lsparam.LOSTConfig(rank=8))
        >>> x = torch.randn(4, 32)
        >>> y = model(x)
        >>> _ = lsparam.merge(model)
        >>> type(model[0]) is torch.nn.Linear, torch.allclose(model(x), y, atol=1e-6)
        (True, True)
    """
    layers = structured_layers(model)
    require_dense_form(layers, "cannot be merged; no layer was changed")
    for layer, _ in layers.values():
        with torch.no_grad():
            weight = layer.weight.dense().contiguous()
        requires_grad = any(p.requires_grad for p in layer.parametrizations.weight.parameters())
        remove_structured_weight(layer, nn.Parameter(weight, requires_grad=requires_grad))
    return model


def summary(model: nn.Module) -> str:
    """A per-layer table: method, shape, parameters before and after, sparse entries, and the init error;
    totals below.

    ``init error`` is the relative Frobenius error ``‖W_start − W‖ / ‖W‖`` of the weight each layer started
    from against the dense weight ``W`` it replaced, measured by :func:`parametrize`: what converting a
    trained model cost before any training (``init="dense"`` makes it as small as the structure allows).
    It shows ``-`` for layers with no dense form and after a state_dict was loaded over the factors.

    Example:
        >>> import torch, lsparam
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
        >>> _ = lsparam.parametrize(model, lsparam.LowRankConfig(rank=16))
        >>> print(lsparam.summary(model))  # doctest: +NORMALIZE_WHITESPACE
        layer  method   shape   params before  params after  nnz  init error
        0      lowrank  64x64   4,096          2,048         0    61.2%
        total                   4,096          2,048         0
        model parameters: 2,048 (was 4,096 dense; 50.0%)
    """
    rows = [("layer", "method", "shape", "params before", "params after", "nnz", "init error")]
    before_total = after_total = nnz_total = 0
    for name, (layer, parametrization) in structured_layers(model).items():
        before = parametrization.out_features * parametrization.in_features
        after = sum(p.numel() for p in layer.parametrizations.weight.parameters())
        nnz = parametrization.nnz()
        before_total, after_total, nnz_total = before_total + before, after_total + after, nnz_total + nnz
        shape = f"{parametrization.out_features}x{parametrization.in_features}"
        error = "-" if parametrization.init_error is None else f"{100 * parametrization.init_error:.1f}%"
        rows.append((name or "(model)", parametrization.method, shape, f"{before:,}", f"{after:,}", f"{nnz:,}", error))
    rows.append(("total", "", "", f"{before_total:,}", f"{after_total:,}", f"{nnz_total:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    params = sum(p.numel() for p in model.parameters())
    dense_params = params - after_total + before_total
    share = 100.0 * params / dense_params if dense_params else 100.0
    lines.append(f"model parameters: {params:,} (was {dense_params:,} dense; {share:.1f}%)")
    return "\n".join(lines)
