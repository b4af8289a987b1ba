"""``transformers.Trainer`` integration: the optimizer, checkpoints, and a dense export.

- :func:`lean_optimizer` builds a :class:`~lsparam.optim.LeanOptimizer` for
  ``Trainer(optimizers=(optimizer, None))``, taking lr, weight decay, betas and eps from the
  ``TrainingArguments``; :func:`optimizer_cls_and_kwargs` gives the same optimizer for
  ``Trainer(optimizer_cls_and_kwargs=...)`` (the way that also works under FSDP).
- :class:`TrainerLeanOptimizer` is the ``LeanOptimizer`` they build: it follows the Trainer's
  gradient-accumulation windows instead of counting micro-batches itself, and adds no averaging of its
  own, because the Trainer already scales each micro-batch's loss (see :func:`lean_optimizer`).
- Checkpoints: ``trainer.save_model()`` and the Trainer's checkpoints already save a parametrized model's
  ``state_dict`` (factors, ``lsparam_spec``, LOST ``channels``) to ``model.safetensors``, and
  ``trainer.train(resume_from_checkpoint=...)`` restores weights, optimizer and scheduler exactly.
  :class:`LsparamCallback` adds a readable ``lsparam_config.json`` to every checkpoint;
  :func:`load_parametrized` rebuilds the parametrized model from such a folder.
- :func:`save_pretrained` writes a dense model that vanilla ``AutoModelForCausalLM.from_pretrained`` loads.

``from_pretrained`` on a *parametrized* checkpoint does not work: its keys
(``...q_proj.parametrizations.weight.original0``) are not the model's (``...q_proj.weight``), so
``transformers`` reports them as unexpected and leaves those layers randomly initialised (a load report,
no error). Use :func:`load_parametrized` for such a folder.
"""

from __future__ import annotations

import inspect
import json
import os

import torch
from torch import nn

from lsparam.api import parametrize, require_dense_form, structured_layers
from lsparam.methods import registered_methods
from lsparam.methods.base import decode_spec
from lsparam.optim.lean import LeanOptimizer

__all__ = [
    "LSPARAM_CONFIG_NAME",
    "LsparamCallback",
    "TrainerLeanOptimizer",
    "dense_state_dict",
    "lean_optimizer",
    "load_parametrized",
    "lsparam_config",
    "optimizer_cls_and_kwargs",
    "save_lsparam_config",
    "save_parametrized",
    "save_pretrained",
]

LSPARAM_CONFIG_NAME = "lsparam_config.json"
_SPEC_SUFFIX = "parametrizations.weight.0.lsparam_spec"
_PARAMETRIZED_INFIX = "parametrizations.weight."


# ---- the optimizer ---------------------------------------------------------------------------------


def _window_ends() -> bool:
    """True when the current backward is the last micro-batch of the Trainer's accumulation window.

    ``Trainer`` sets accelerate's shared ``GradientState.sync_gradients`` before every micro-batch's
    forward and backward (True on the last micro-batch of a window, including a shorter last window of an
    epoch). Outside a Trainer it stays True: every backward ends a window.
    """
    try:
        from accelerate.state import GradientState
    except ImportError:  # pragma: no cover - Trainer itself requires accelerate
        return True
    return bool(GradientState().sync_gradients)


class TrainerLeanOptimizer(LeanOptimizer):
    """A :class:`~lsparam.optim.LeanOptimizer` whose accumulation windows are the Trainer's.

    Under ``transformers.Trainer`` gradient accumulation is the Trainer's job: it scales each
    micro-batch's loss so that the summed gradients are the window's mean gradient, and calls ``step()``
    once per window. So this optimizer never divides the accumulated gradients, and with
    ``per_layer=True`` (updates inside backward, where no ``step()`` call can tell it) it updates on the
    backward of the window's last micro-batch, as the Trainer flags it through accelerate's
    ``GradientState.sync_gradients``. That also handles a last window of an epoch shorter than
    ``gradient_accumulation_steps``, which a micro-batch counter would get out of phase with.

    Build it with :func:`lean_optimizer` or :func:`optimizer_cls_and_kwargs` rather than directly; its
    arguments are ``LeanOptimizer``'s, except ``accumulation_steps``, which it refuses.

    Example:
        >>> import torch, lsparam
        >>> from lsparam.hf import TrainerLeanOptimizer
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> TrainerLeanOptimizer(model, torch.optim.AdamW, lr=1e-3, per_layer=True)
        TrainerLeanOptimizer(AdamW, per_layer=True, state_bits=32, accumulation_steps=1, clip_norm=None, params=2)
    """

    def __init__(self, params, optimizer_cls=torch.optim.AdamW, **kwargs):
        if "accumulation_steps" in kwargs:
            raise TypeError(
                f"TrainerLeanOptimizer takes no accumulation_steps (got accumulation_steps="
                f"{kwargs['accumulation_steps']!r}): under Trainer, set "
                f"TrainingArguments(gradient_accumulation_steps=...) instead; the optimizer follows the "
                f"Trainer's windows. Outside a Trainer, use lsparam.optim.LeanOptimizer(accumulation_steps=...)."
            )
        super().__init__(params, optimizer_cls, accumulation_steps=1, **kwargs)

    def _boundary(self, key) -> bool:
        # Overrides LeanOptimizer's micro-batch counter (kept for bookkeeping): the Trainer decides where a
        # window ends. With per_layer=False it calls step() only there.
        self._micro_steps[key] += 1
        return _window_ends() if self.per_layer else True

    def __repr__(self) -> str:
        return "Trainer" + super().__repr__()


def _check_training_args(args) -> None:
    try:
        from transformers import TrainingArguments
    except ImportError:  # pragma: no cover
        TrainingArguments = None
    if TrainingArguments is not None and not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a transformers.TrainingArguments; got {type(args).__name__}")


def _optimizer_kwargs(args, optimizer_cls, per_layer, state_bits, clip_norm, kwargs) -> dict:
    """The keyword arguments of a TrainerLeanOptimizer built from ``args``, after checking the combination."""
    _check_training_args(args)
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be a bool; got per_layer={per_layer!r}")
    if "accumulation_steps" in kwargs:
        raise TypeError(
            f"accumulation_steps is not an option here (got accumulation_steps={kwargs['accumulation_steps']!r}): "
            f"the Trainer accumulates gradients; set TrainingArguments(gradient_accumulation_steps=...)."
        )
    if clip_norm is not None and not per_layer:
        raise ValueError(
            f"clip_norm={clip_norm!r} with per_layer=False: the Trainer already clips the global gradient norm "
            f"at TrainingArguments.max_grad_norm (now {args.max_grad_norm}); use that instead. clip_norm is "
            f"for per_layer=True only."
        )
    if per_layer:
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(
                f"per_layer=True with TrainingArguments.max_grad_norm={args.max_grad_norm}: per-layer updates "
                f"free each gradient inside backward, so the Trainer's global-norm clipping would find no "
                f"gradients and silently clip nothing. Set TrainingArguments(max_grad_norm=0) and, for "
                f"clipping, pass clip_norm=... here (each parameter's own gradient norm)."
            )
        if args.fp16:
            raise ValueError(
                "per_layer=True with TrainingArguments(fp16=True): the fp16 GradScaler unscales gradients "
                "before step(), but per-layer updates happen inside backward on still-scaled gradients. "
                "Use bf16=True, or per_layer=False."
            )
        if args.deepspeed or args.fsdp or args.world_size > 1:
            raise ValueError(
                f"per_layer=True is single-process only (world_size={args.world_size}, "
                f"deepspeed={args.deepspeed!r}, fsdp={args.fsdp!r}): the update would run on the local "
                f"gradient before it is reduced across processes. Use per_layer=False."
            )
    if args.fp16 and state_bits != 32:
        raise ValueError(
            f"state_bits={state_bits} with TrainingArguments(fp16=True): fp16 loss scaling with torchao's "
            f"low-bit states is untested (fp16 training needs CUDA, which lsparam's CI lacks). Use "
            f"bf16=True, or state_bits=32."
        )
    options = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    accepted = inspect.signature(optimizer_cls.__init__).parameters if isinstance(optimizer_cls, type) else {}
    if "betas" in accepted:
        options["betas"] = (args.adam_beta1, args.adam_beta2)
    if "eps" in accepted:
        options["eps"] = args.adam_epsilon
    if "fused" in accepted and state_bits == 32:  # as the Trainer's own optimizer: fused for a *_fused optim
        options["fused"] = str(getattr(args.optim, "value", args.optim)).endswith("_fused")
    options.update(kwargs)  # explicit keywords win over TrainingArguments
    if "foreach" in kwargs and "fused" not in kwargs:
        options.pop("fused", None)
    options.update(per_layer=per_layer, state_bits=state_bits, clip_norm=clip_norm)
    return options


def lean_optimizer(
    model: nn.Module,
    args,
    optimizer_cls=torch.optim.AdamW,
    *,
    per_layer: bool = False,
    state_bits: int = 32,
    clip_norm: float | None = None,
    **kwargs,
) -> TrainerLeanOptimizer:
    """A :class:`TrainerLeanOptimizer` for ``Trainer(optimizers=(optimizer, None))``.

    ``lr`` (``args.learning_rate``), ``weight_decay``, and for optimizers that take them ``betas``
    (``adam_beta1``, ``adam_beta2``) and ``eps`` (``adam_epsilon``) come from ``args``; keyword arguments
    override them or pass through to ``optimizer_cls``. Pass ``None`` as the scheduler: the Trainer then
    builds its own from ``args`` (``lr_scheduler_type``, warmup) on this optimizer. Parameters are grouped
    by role (weight decay on weights and lsparam factors, not on biases and norms).

    How it fits the Trainer (transformers 5.x; checked against 5.23):

    - gradient accumulation: the Trainer divides each micro-batch's loss (by the window's number of
      label tokens for models that take ``num_items_in_batch``, as ``LlamaForCausalLM``; otherwise by the
      number of micro-batches), so the summed gradients are already the window's mean. The optimizer
      adds no averaging and, with ``per_layer=True``, updates on the window's last backward.
    - clipping: with ``per_layer=False`` the Trainer clips the global norm at ``args.max_grad_norm``
      as usual. With ``per_layer=True`` the gradients are freed inside backward, so the Trainer's
      clipping would see none: ``args.max_grad_norm`` must be 0 (else ``ValueError``), and ``clip_norm``
      clips each parameter's own gradient norm. The Trainer's logged ``grad_norm`` is then 0.
    - refused with ``per_layer=True``: ``fp16=True`` (the GradScaler unscales only before ``step()``),
      and DeepSpeed, FSDP or more than one process.

    Args:
        model: the (parametrized) model the Trainer trains; create the optimizer after moving it to its
            device.
        args: the ``transformers.TrainingArguments`` given to the Trainer.
        optimizer_cls: the optimizer class to wrap (``torch.optim.AdamW`` by default).
        per_layer, state_bits: as for :class:`~lsparam.optim.LeanOptimizer`.
        clip_norm: per-parameter clipping, with ``per_layer=True`` only.

    Example:
        >>> import torch, lsparam, lsparam.hf
        >>> from transformers import TrainingArguments
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 8))
        >>> _ = lsparam.parametrize(model, lsparam.LowRankConfig(rank=4))
        >>> args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True,
        ...                          learning_rate=3e-3, weight_decay=0.1, max_grad_norm=0.0)
        >>> opt = lsparam.hf.lean_optimizer(model, args, per_layer=True, clip_norm=1.0)
        >>> opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"], opt.param_groups[0]["betas"]
        (0.003, 0.1, (0.9, 0.999))
        >>> # trainer = Trainer(model=model, args=args, train_dataset=..., optimizers=(opt, None))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    options = _optimizer_kwargs(args, optimizer_cls, per_layer, state_bits, clip_norm, kwargs)
    return TrainerLeanOptimizer(model, optimizer_cls, **options)


def optimizer_cls_and_kwargs(
    args,
    optimizer_cls=torch.optim.AdamW,
    *,
    per_layer: bool = False,
    state_bits: int = 32,
    clip_norm: float | None = None,
    **kwargs,
) -> tuple[type, dict]:
    """``(TrainerLeanOptimizer, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The Trainer then builds the optimizer itself, on its own parameter groups (weight decay except on
    biases and norms) and after it has prepared the model: the way custom optimizers work under FSDP,
    where ``optimizers=(...)`` is refused. Same options, checks and Trainer behaviour as
    :func:`lean_optimizer`.

    Example:
        >>> import torch, lsparam.hf
        >>> from transformers import TrainingArguments
        >>> args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True, learning_rate=1e-3)
        >>> cls, kwargs = lsparam.hf.optimizer_cls_and_kwargs(args)
        >>> cls.__name__, kwargs["optimizer_cls"].__name__, kwargs["lr"], kwargs["per_layer"]
        ('TrainerLeanOptimizer', 'AdamW', 0.001, False)
        >>> # trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=(cls, kwargs), ...)
    """
    options = _optimizer_kwargs(args, optimizer_cls, per_layer, state_bits, clip_norm, kwargs)
    # Validate now (bad lr, state_bits...) rather than when the Trainer starts training.
    TrainerLeanOptimizer([torch.zeros(1, requires_grad=True)], optimizer_cls, **{**options, "per_layer": False})
    return TrainerLeanOptimizer, {"optimizer_cls": optimizer_cls, **options}


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
        >>> import torch, lsparam, lsparam.hf
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
        >>> _ = lsparam.parametrize(model, lsparam.LowRankConfig(rank=4))
        >>> lsparam.hf.lsparam_config(model)["groups"]
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
        >>> import json, tempfile, torch, lsparam, lsparam.hf
        >>> model = lsparam.parametrize(torch.nn.Sequential(torch.nn.Linear(16, 16)), lsparam.LowRankConfig(rank=4))
        >>> path = lsparam.hf.save_lsparam_config(model, tempfile.mkdtemp())
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


def _transformers_callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover
        return object
    return TrainerCallback


class LsparamCallback(_transformers_callback_base()):
    """A ``TrainerCallback`` that writes ``lsparam_config.json`` into every checkpoint the Trainer saves.

    The checkpoint does not need it to load (:func:`load_parametrized` reads each layer's config from its
    ``lsparam_spec`` tensor in the weights); it is the readable record of what the model is, next to
    ``config.json``. ``trainer.save_model()`` does not run callbacks: use :func:`save_parametrized`, or
    :func:`save_lsparam_config` after it.

    Example:
        >>> from lsparam.hf import LsparamCallback
        >>> # trainer = Trainer(..., callbacks=[LsparamCallback()])
        >>> LsparamCallback().__class__.__mro__[1].__name__
        'TrainerCallback'
    """

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None or not args.should_save:
            return
        if not structured_layers(model):
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            save_lsparam_config(model, folder)


# ---- saving ----------------------------------------------------------------------------------------


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s ``state_dict`` with every lsparam layer's entries replaced by its dense ``weight``.

    The keys are those of the unparametrized model, so a dense model of the same architecture loads it.
    Only the dense weights are new memory; the model is not changed. SiLU-LOST layers have no dense
    form: ``NoDenseFormError``.

    Example:
        >>> import torch, lsparam, lsparam.hf
        >>> model = lsparam.parametrize(torch.nn.Sequential(torch.nn.Linear(16, 8)), lsparam.LowRankConfig(rank=4))
        >>> sd = lsparam.hf.dense_state_dict(model)
        >>> sorted(sd), tuple(sd["0.weight"].shape)
        (['0.bias', '0.weight'], (8, 16))
        >>> plain = torch.nn.Sequential(torch.nn.Linear(16, 8))
        >>> plain.load_state_dict(sd)
        <All keys matched successfully>
    """
    layers = structured_layers(model)
    require_dense_form(
        layers, "cannot be exported as a dense model; save it parametrized (lsparam.hf.save_parametrized) instead"
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
    SiLU-LOST layers (``NoDenseFormError``): they have no dense form.

    Example:
        >>> import tempfile, torch, lsparam, lsparam.hf
        >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2)
        >>> model = lsparam.parametrize(LlamaForCausalLM(config), lsparam.LOSTConfig(rank=8))
        >>> folder = tempfile.mkdtemp()
        >>> lsparam.hf.save_pretrained(model, folder)
        >>> dense = AutoModelForCausalLM.from_pretrained(folder)
        >>> ids = torch.randint(0, 64, (1, 8))
        >>> torch.allclose(dense(ids).logits, model(ids).logits, atol=1e-5)
        True
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"model must be a transformers PreTrainedModel (with save_pretrained); got {type(model).__name__}. "
            f"For a plain nn.Module, save lsparam.hf.dense_state_dict(model) instead."
        )
    if "state_dict" in kwargs:
        raise TypeError("save_pretrained takes no state_dict here: the dense state_dict is computed from the model")
    model.save_pretrained(save_directory, state_dict=dense_state_dict(model), **kwargs)


def save_parametrized(model: nn.Module, save_directory, **kwargs) -> None:
    """Save ``model`` as it is (factors and all) plus ``lsparam_config.json``; reload with :func:`load_parametrized`.

    The same files a Trainer checkpoint holds for the model. Keyword arguments pass through to
    ``model.save_pretrained``.

    Example:
        >>> import os, tempfile, lsparam, lsparam.hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2)
        >>> model = lsparam.parametrize(LlamaForCausalLM(config), lsparam.SLTrainConfig(rank=8, density=0.05))
        >>> folder = tempfile.mkdtemp()
        >>> lsparam.hf.save_parametrized(model, folder)
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
        >>> import tempfile, torch, lsparam, lsparam.hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2)
        >>> model = lsparam.parametrize(LlamaForCausalLM(config), lsparam.LOSTConfig(rank=8))
        >>> folder = tempfile.mkdtemp()
        >>> model.save_pretrained(folder)          # what Trainer.save_model and checkpoints write
        >>> restored = lsparam.hf.load_parametrized(folder)
        >>> ids = torch.randint(0, 64, (1, 8))
        >>> torch.equal(restored(ids).logits, model(ids).logits)
        True
    """
    import transformers

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
        parametrize(model, config_obj, target_modules=names, progress=False)

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
