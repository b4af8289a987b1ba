"""``transformers.Trainer`` integration: the optimizer and a checkpoint callback, over :mod:`lsparam.io`.

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
  :class:`LsparamCallback` adds a readable ``lsparam_config.json`` to every checkpoint.

Saving, loading and the dense export live in :mod:`lsparam.io`; their names are also importable from
here (``lsparam.hf.load_parametrized``, ``lsparam.hf.save_pretrained``, ...), where Trainer users look.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn

from lsparam.api import structured_layers
from lsparam.extras import require
from lsparam.io import (  # noqa: F401  (re-exported for Trainer users)
    LSPARAM_CONFIG_NAME,
    dense_state_dict,
    load_parametrized,
    lsparam_config,
    save_lsparam_config,
    save_parametrized,
    save_pretrained,
)
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
    TrainingArguments = require("transformers", "hf", "lsparam.hf").TrainingArguments
    if not isinstance(args, TrainingArguments):
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


