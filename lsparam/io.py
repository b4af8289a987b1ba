"""Saving and loading parametrized models, and their dense export.

- :func:`dense_state_dict`: the state_dict a plain dense model of the same architecture loads;
  :func:`save_pretrained` writes it as a ``transformers`` folder that vanilla ``from_pretrained`` loads.
- :func:`save_parametrized` writes a model as it is (factors and all) plus a readable
  ``lsparam_config.json``; :func:`load_parametrized` rebuilds it from the specs each layer stores in its
  ``lsparam_spec`` tensor, so nothing needs remembering.
- :func:`lsparam_config`: what lsparam did to a model, as JSON-able data.

``from_pretrained`` on a *parametrized* checkpoint does not work: its keys
(``...q_proj.parametrizations.weight.original0``) are not the model's (``...q_proj.weight``), so
``transformers`` reports them as unexpected and leaves those layers randomly initialised (a load report,
no error). Use :func:`load_parametrized` for such a folder.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from lsparam.api import parametrize, require_dense_form, structured_layers
from lsparam.extras import require
from lsparam.methods import registered_methods
from lsparam.methods.base import decode_spec

__all__ = [
    "LSPARAM_CONFIG_NAME",
    "dense_state_dict",
    "load_parametrized",
    "lsparam_config",
    "save_lsparam_config",
    "save_parametrized",
    "save_pretrained",
]

LSPARAM_CONFIG_NAME = "lsparam_config.json"
_SPEC_SUFFIX = "parametrizations.weight.0.lsparam_spec"
_PARAMETRIZED_INFIX = "parametrizations.weight."


# ---- the lsparam config of a model, and of a checkpoint -----------------------------------------


def _groups(specs: dict[str, dict]) -> list[dict]:
    """Layers with the same method and config, as ``{"method", "config", "target_modules"}`` groups."""
    groups: dict[str, dict] = {}
    for name, spec in specs.items():
        key = json.dumps([spec.get("method"), spec.get("config")], sort_keys=True)
        group = groups.setdefault(key, {"method": spec.get("method"), "config": spec.get("config"), "target_modules": []})
        group["target_modules"].append(name)
    return list(groups.values())


def lsparam_config(model: nn.Module) -> dict:
    """What lsparam did to ``model``, as JSON-able data: layers grouped by method and config.

    ``{"lsparam_version": ..., "groups": [{"method", "config", "target_modules"}, ...]}``, where
    ``target_modules`` are full layer names (``lsparam.parametrize(model, config,
    target_modules=names)`` redoes a group).

    Example:
        >>> import torch, lsparam, lsparam.io
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
        >>> _ = lsparam.parametrize(model, lsparam.LowRankConfig(rank=4))
        >>> lsparam.io.lsparam_config(model)["groups"]
        [{'method': 'lowrank', 'config': {'method': 'lowrank', 'rank': 4, 'init': 'dense'}, 'target_modules': ['0', '1']}]
    """
    from lsparam import __version__

    specs = {name: parametrization.spec() for name, (_, parametrization) in structured_layers(model).items()}
    if not specs:
        raise ValueError("the model has no lsparam layers: parametrize it first (lsparam.parametrize)")
    return {"lsparam_version": __version__, "groups": _groups(specs)}


def save_lsparam_config(model: nn.Module, save_directory) -> str:
    """Write :func:`lsparam_config` to ``save_directory/lsparam_config.json``; returns the path.

    Example:
        >>> import json, tempfile, torch, lsparam, lsparam.io
        >>> model = lsparam.parametrize(torch.nn.Sequential(torch.nn.Linear(16, 16)), lsparam.LowRankConfig(rank=4))
        >>> path = lsparam.io.save_lsparam_config(model, tempfile.mkdtemp())
        >>> json.load(open(path))["groups"][0]["method"]
        'lowrank'
    """
    config = lsparam_config(model)
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(os.fspath(save_directory), LSPARAM_CONFIG_NAME)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


# ---- saving ----------------------------------------------------------------------------------------


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s ``state_dict`` with every lsparam layer's entries replaced by its dense ``weight``.

    The keys are those of the unparametrized model, so a dense model of the same architecture loads it.
    Only the dense weights are new memory; the model is not changed. SiLU-LOST and CoLA layers have no dense
    form: ``NoDenseFormError``.

    Example:
        >>> import torch, lsparam, lsparam.io
        >>> model = lsparam.parametrize(torch.nn.Sequential(torch.nn.Linear(16, 8)), lsparam.LowRankConfig(rank=4))
        >>> sd = lsparam.io.dense_state_dict(model)
        >>> sorted(sd), tuple(sd["0.weight"].shape)
        (['0.bias', '0.weight'], (8, 16))
        >>> plain = torch.nn.Sequential(torch.nn.Linear(16, 8))
        >>> plain.load_state_dict(sd)
        <All keys matched successfully>
    """
    layers = structured_layers(model)
    require_dense_form(
        layers, "cannot be exported as a dense model; save it parametrized (lsparam.io.save_parametrized) instead"
    )
    prefixes = {(f"{name}." if name else ""): layer for name, (layer, _) in layers.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        head, infix, _ = key.partition(_PARAMETRIZED_INFIX)
        if infix and head in prefixes:
            weight_key = f"{head}weight"
            if weight_key not in out:  # the layer's first parametrization entry: put its dense weight here
                with torch.no_grad():
                    out[weight_key] = prefixes[head].weight.dense().detach().contiguous()
            continue
        out[key] = value
    return out


def save_pretrained(model: nn.Module, save_directory, **kwargs) -> None:
    """Save ``model`` as a plain dense ``transformers`` model; ``model`` itself stays parametrized.

    Writes what ``model.save_pretrained`` writes (``config.json``, ``model.safetensors``...) but with the
    dense weights of :func:`dense_state_dict`, so vanilla ``AutoModelForCausalLM.from_pretrained`` loads
    it and computes the same function. Keyword arguments pass through to ``save_pretrained``. Refuses
    SiLU-LOST and CoLA layers (``NoDenseFormError``): they have no dense form.

    Example:
        >>> import tempfile, torch, lsparam, lsparam.io
        >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2)
        >>> model = lsparam.parametrize(LlamaForCausalLM(config), lsparam.LOSTConfig(rank=8))
        >>> folder = tempfile.mkdtemp()
        >>> lsparam.io.save_pretrained(model, folder)
        >>> dense = AutoModelForCausalLM.from_pretrained(folder)
        >>> ids = torch.randint(0, 64, (1, 8))
        >>> torch.allclose(dense(ids).logits, model(ids).logits, atol=1e-5)
        True
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"model must be a transformers PreTrainedModel (with save_pretrained); got {type(model).__name__}. "
            f"For a plain nn.Module, save lsparam.io.dense_state_dict(model) instead."
        )
    if "state_dict" in kwargs:
        raise TypeError("save_pretrained takes no state_dict here: the dense state_dict is computed from the model")
    model.save_pretrained(save_directory, state_dict=dense_state_dict(model), **kwargs)


def save_parametrized(model: nn.Module, save_directory, **kwargs) -> None:
    """Save ``model`` as it is (factors and all) plus ``lsparam_config.json``; reload with :func:`load_parametrized`.

    The same files a Trainer checkpoint holds for the model. Keyword arguments pass through to
    ``model.save_pretrained``.

    Example:
        >>> import os, tempfile, lsparam, lsparam.io
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2)
        >>> model = lsparam.parametrize(LlamaForCausalLM(config), lsparam.SLTrainConfig(rank=8, density=0.05))
        >>> folder = tempfile.mkdtemp()
        >>> lsparam.io.save_parametrized(model, folder)
        >>> sorted(f for f in os.listdir(folder) if f.endswith("json") or f.endswith("safetensors"))
        ['config.json', 'generation_config.json', 'lsparam_config.json', 'model.safetensors']
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"model must be a transformers PreTrainedModel (with save_pretrained); got {type(model).__name__}. "
            f"For a plain nn.Module, save model.state_dict() (see docs/index.md)."
        )
    lsparam_config(model)  # refuses a model without lsparam layers before writing anything
    model.save_pretrained(save_directory, **kwargs)
    save_lsparam_config(model, save_directory)


# ---- loading ---------------------------------------------------------------------------------------


def _read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single, device="cpu")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state_dict = {}
        for shard in shards:
            state_dict.update(load_file(os.path.join(directory, shard), device="cpu"))
        return state_dict
    binary = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"no weights in {directory!r}: expected model.safetensors, model.safetensors.index.json or "
        f"pytorch_model.bin (a folder written by save_pretrained, Trainer.save_model or a Trainer checkpoint)"
    )


def _config_from_dict(name: str, method: str, fields) -> object:
    methods = registered_methods()
    if method not in methods:
        raise ValueError(
            f"layer {name!r} was parametrized with method {method!r}, which is not registered here; known "
            f"methods: {sorted(methods)}. Register it (lsparam.register_method) before loading."
        )
    if not isinstance(fields, dict):
        raise ValueError(
            f"layer {name!r} (method {method!r}) stored its config as {fields!r}, not as fields: its config class "
            f"has no to_dict(), so it cannot be rebuilt. Parametrize the model yourself and load_state_dict."
        )
    fields = {k: v for k, v in fields.items() if k != "method"}
    try:
        return methods[method].config_cls(**fields)
    except TypeError as error:
        raise ValueError(f"cannot rebuild the {method!r} config of layer {name!r} from {fields!r}: {error}") from error


def load_parametrized(save_directory, model_cls=None, *, dtype: torch.dtype | str | None = "auto") -> nn.Module:
    """Rebuild a parametrized model from a folder written by the Trainer or :func:`save_parametrized`.

    Builds the model from ``config.json``, parametrizes it with the config each layer stored in its
    ``lsparam_spec`` tensor (so nothing needs remembering), and loads the weights (``model.safetensors``,
    sharded safetensors, or ``pytorch_model.bin``). Every key must match. Returns the model in eval mode,
    like ``from_pretrained``.

    Args:
        save_directory: a checkpoint folder (``checkpoint-500``, or the output of ``trainer.save_model``).
        model_cls: the model class or auto class (``AutoModelForCausalLM``...); default: the class named
            in ``config.json``'s ``architectures``.
        dtype: the dtype of the returned model: ``"auto"`` (default, as ``from_pretrained`` in
            transformers 5) the ``dtype`` in ``config.json``, a ``torch.dtype``, or ``None`` for the
            dtype the model is built in (float32). The model is built and parametrized in float32 (SVDs
            need it) and cast at the end.

    Building first initialises the model and its factors (an SVD per layer for LOST and low-rank) before
    the weights overwrite them: for a large model that takes a while.

    Example:
        >>> import tempfile, torch, lsparam, lsparam.io
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2)
        >>> model = lsparam.parametrize(LlamaForCausalLM(config), lsparam.LOSTConfig(rank=8))
        >>> folder = tempfile.mkdtemp()
        >>> model.save_pretrained(folder)          # what Trainer.save_model and checkpoints write
        >>> restored = lsparam.io.load_parametrized(folder)
        >>> ids = torch.randint(0, 64, (1, 8))
        >>> torch.equal(restored(ids).logits, model(ids).logits)
        True
    """
    transformers = require("transformers", "hf", "load_parametrized")
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path; got {type(save_directory).__name__}")
    directory = os.fspath(save_directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"no config.json in {directory!r}: not a saved transformers model")
    if dtype is not None and dtype != "auto" and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be 'auto', a torch.dtype or None; got dtype={dtype!r}")
    config = transformers.AutoConfig.from_pretrained(directory)
    if dtype == "auto":
        dtype = _config_dtype(config)
    state_dict = _read_state_dict(directory)

    specs = {}
    for key, value in state_dict.items():
        if key == _SPEC_SUFFIX or key.endswith("." + _SPEC_SUFFIX):
            name = key[: -len(_SPEC_SUFFIX)].rstrip(".")
            specs[name] = json.loads(decode_spec(value))
    if not specs:
        raise ValueError(
            f"{directory!r} holds no lsparam layers (no '*.{_SPEC_SUFFIX}' entries): it is a plain model, "
            f"load it with from_pretrained"
        )

    if model_cls is None:
        architectures = getattr(config, "architectures", None) or []
        model_cls = getattr(transformers, architectures[0], None) if architectures else None
        if model_cls is None:
            raise ValueError(
                f"config.json in {directory!r} names no architecture this transformers knows "
                f"(architectures={architectures!r}); pass model_cls=, e.g. AutoModelForCausalLM"
            )
    if hasattr(model_cls, "from_config"):  # auto classes, and PreTrainedModel subclasses alike
        model = model_cls.from_config(config)
    elif isinstance(model_cls, type) and issubclass(model_cls, nn.Module):
        model = model_cls(config)
    else:
        raise TypeError(f"model_cls must be a model class or auto class; got {model_cls!r}")

    for group in _groups(specs):
        names = group["target_modules"]
        config_obj = _config_from_dict(names[0], group["method"], group["config"])
        for root, relative in _by_parametrize_root(names, specs).items():
            parametrize(model.get_submodule(root) if root else model, config_obj, target_modules=relative, progress=False)

    result = model.load_state_dict(state_dict, strict=False)
    tied = _tied_names(model)
    missing = [k for k in result.missing_keys if k not in tied or not (tied[k] & set(state_dict))]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the weights in {directory!r} do not match the rebuilt model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            f"{'...' if len(result.unexpected_keys) > 5 else ''}"
        )
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _by_parametrize_root(names: list[str], specs: dict[str, dict]) -> dict[str, list[str]]:
    """The layers by the module ``parametrize`` was called on, with their names from there: SLTrain's
    random support is drawn from the layer's name as that call saw it (its spec's ``support_name``), so
    ``parametrize(model.model, ...)`` must be redone on ``model.model``.

    >>> _by_parametrize_root(["model.layers.0.q", "lm_head"], {"model.layers.0.q": {"support_name": "layers.0.q"},
    ...                                                        "lm_head": {}})
    {'model': ['layers.0.q'], '': ['lm_head']}
    """
    roots: dict[str, list[str]] = {}
    for name in names:
        seen_as = specs[name].get("support_name", name)
        root = name[: -len(seen_as) - 1] if seen_as and seen_as != name and name.endswith("." + seen_as) else ""
        roots.setdefault(root, []).append(seen_as if root else name)
    return roots


def _config_dtype(config) -> torch.dtype | None:
    """The ``dtype`` (``torch_dtype`` before transformers 5) that ``config.json`` records, if any."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    """For each parameter name, the other names of the same tensor (tied weights are saved once)."""
    by_tensor: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), set()).add(name)
    return {name: names - {name} for names in by_tensor.values() for name in names if len(names) > 1}
