"""The base class every method's parametrization derives from.

A parametrization is registered on one ``nn.Linear`` weight with ``torch.nn.utils.parametrize``. Its
``right_inverse`` turns the layer's current dense weight into the method's factors; those factors become
the parametrization's *originals* (``parametrizations.weight.original0``, ``original1``, ...) and are
the only trainable tensors. ``forward`` wraps them in a :class:`~lsparam.weight.StructuredWeight`.

A method implements three things:

- ``init_factors(weight)``: dense ``out×in`` weight -> tuple of factor tensors (may set buffers);
- ``dense(*factors)``: the dense matrix, differentiable (or raise ``NoDenseFormError``);
- ``linear(x, *factors)``: ``x Wᵀ`` without forming ``W`` (defaults to ``x @ dense().T``).
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize
from torch import nn

from lsparam.weight import NoDenseFormError, StructuredWeight


class StructuredParametrization(nn.Module):
    """Base class for one weight's structured parametrization.

    Args:
        config: the method's config dataclass (stored as a fingerprint in the state_dict).
        out_features, in_features: the layer's weight shape.
        layer_name: the layer's qualified name in the model (seeds random supports).

    Subclasses set ``method``, ``factor_names`` and ``factor_roles`` and implement ``init_factors`` and
    ``dense``; they override ``linear`` for a factorised forward. A role says what a factor is to code
    that treats factors alike across methods (optimizers, ledgers, reports): ``"lowrank_out"`` (``B``,
    ``out×r``), ``"lowrank_in"`` (``A``, ``r×in``), ``"sparse"`` (the sparse part's values), or
    ``"other"``.

    A method always works on the ``out×in`` weight. ``transposed`` is True when the module stores its
    weight as ``in×out`` (transformers' ``Conv1D``, set by :func:`lsparam.parametrize`): the layer's
    weight is then the transpose of ``dense()``. ``init_error`` is the relative Frobenius error of the
    starting weight against the dense weight it replaced (``None`` without a dense form, or once a
    state_dict has been loaded over the factors).

    ``no_dense_reason`` says, in error messages, why a layer without a dense form has none.
    ``load_ignores`` names config fields that change how the forward runs but not what it computes or what
    the factors mean (CoLA's ``checkpoint``): a state_dict saved with other values of them still loads.
    """

    method: str = "structured"
    factor_names: tuple[str, ...] = ()
    factor_roles: tuple[str, ...] = ()  # one per factor name; "other" where a subclass leaves it empty
    has_dense_form: bool = True
    no_dense_reason: str = ""
    load_ignores: tuple[str, ...] = ()

    def __init__(self, config, out_features: int, in_features: int, layer_name: str = ""):
        super().__init__()
        self.config = config
        self.out_features = int(out_features)
        self.in_features = int(in_features)
        self.layer_name = layer_name
        self.transposed = False
        self.init_error: float | None = None
        self._removal_value = None
        # The config, as JSON bytes: refuses loading a state_dict made with another config.
        self.register_buffer("lsparam_spec", encode_spec(self.spec()))
        self.register_load_state_dict_pre_hook(_check_spec_on_load)

    # ---- what a method implements -------------------------------------------------------------
    def spec(self) -> dict:
        """What must match for a state_dict to load: method, config and shape."""
        fingerprint = self.config.to_dict() if hasattr(self.config, "to_dict") else repr(self.config)
        return {"method": self.method, "config": fingerprint, "shape": [self.out_features, self.in_features]}

    def init_factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def dense(self, *factors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense(*factors))

    def nnz(self) -> int:
        """Entries of the sparse part (0 for methods without one)."""
        return 0

    def index_bytes(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> int:
        """Bytes of index tensors the method keeps in memory beside its factors (sparse supports, kept
        channels), including caches its forward or backward builds on the path it takes for inputs of this
        ``device`` and ``dtype``; 0 for methods without any."""
        return 0

    def roles(self) -> tuple[str, ...]:
        """The role of each factor, in ``factor_names`` order."""
        count = len(self.factor_names)
        return tuple(self.factor_roles) if len(self.factor_roles) == count else ("other",) * count

    # ---- the parametrize protocol -------------------------------------------------------------
    def init_reads_weight(self) -> bool:
        """Whether ``init_factors`` derives the factors from the weight it is given (an SVD, the largest
        entries), rather than drawing them with the weight's shape alone (SLTrain's and CoLA's random inits)."""
        return True

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The factors for ``weight``: at registration, the method's init; afterwards ``layer.weight = W``,
        which factorises ``W`` the same way, refused where the result would not be ``W``'s factorisation."""
        assignment = "_originals" in self.__dict__  # bound by parametrize right after registering
        if assignment:
            self._check_assignable(weight)
        with torch.no_grad():
            factors = self.init_factors(weight.t() if self.transposed else weight)
        if assignment:
            self.init_error = None  # measured against the weight parametrize replaced, not this one
        return tuple(f.to(dtype=weight.dtype, device=weight.device).contiguous() for f in factors)

    def bind(self, originals: nn.Module) -> None:
        """Remember the ``ParametrizationList`` holding this weight's factors (set by ``parametrize``), so
        that a later ``right_inverse`` is known as an assignment and checked against them before any buffer
        changes. A plain attribute, not a submodule: ``copy.deepcopy`` maps it to the copy's list."""
        object.__setattr__(self, "_originals", originals)

    def _check_assignable(self, weight: torch.Tensor) -> None:
        where = f"layer {self.layer_name!r}" if self.layer_name else "this layer"
        reference = self._originals.original0  # torch checks the dtype only after init_factors changed buffers
        shape = (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)
        if tuple(weight.shape) != shape or weight.dtype != reference.dtype or weight.device != reference.device:
            raise ValueError(
                f"`layer.weight = W` on {where}: W must have the layer's shape {shape}, dtype "
                f"{reference.dtype} and device {reference.device}; got {tuple(weight.shape)}, {weight.dtype}, "
                f"{weight.device}"
            )
        if not self.has_dense_form:
            raise NoDenseFormError(
                f"{where} ({self.method}) has no dense form ({self.no_dense_reason}), so it cannot take a dense "
                f"weight: `layer.weight = W` would not make it compute x Wᵀ. Set its factors "
                f"(layer.parametrizations.weight.original0, ... = {list(self.factor_names)}) instead."
            )
        if not self.init_reads_weight():
            raise ValueError(
                f"`layer.weight = W` on {where} would be ignored: its init ({self.method}, "
                f"init={getattr(self.config, 'init', 'random')!r}) draws the factors without reading the weight. "
                f"Parametrize with init='dense' to factorise a given weight, or set the factors "
                f"(layer.parametrizations.weight.original0, ... = {list(self.factor_names)}) directly."
            )

    def forward(self, *factors: torch.Tensor) -> StructuredWeight:
        if self._removal_value is not None:  # see remove_structured_weight
            return self._removal_value
        return StructuredWeight(self, factors)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.init_error = None  # the factors no longer come from the weight they were measured against

    def extra_repr(self) -> str:
        return f"method={self.method!r}, shape=({self.out_features}, {self.in_features})"


def encode_spec(spec: dict) -> torch.Tensor:
    """A layer's spec as the uint8 JSON bytes stored in its ``lsparam_spec`` buffer."""
    data = json.dumps(spec, sort_keys=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode_spec(tensor: torch.Tensor) -> str:
    """The JSON text of an ``lsparam_spec`` tensor (inverse of :func:`encode_spec`)."""
    return bytes(tensor.to(torch.uint8).cpu().tolist()).decode(errors="replace")


def check_specs_before_loading(model: nn.Module, state_dict, prefix: str, *args, **kwargs) -> None:
    """Load pre-hook of a parametrized model: check every layer before anything is copied.

    ``load_state_dict`` copies module by module, so a check that fails at a later layer would leave the
    embeddings and earlier layers overwritten. Refused here, with the model untouched: a layer made with
    another config; a factor of the wrong shape or holding NaN or inf; a layer with some of its factors but
    not all, or its factors without its own buffers (config fingerprint, kept channels, chosen support); a
    dense ``weight`` where the layer holds factors. (A layer absent altogether is left to ``strict``, which
    hooks do not see, so a ``strict=False`` partial load still works.)

    ``parametrize`` registers it on the model and on every module between it and a parametrized layer, so
    a load through a submodule is checked as well. Each load is checked once: where it starts (``prefix``
    empty), or at the model given to ``parametrize`` when the load starts above it (a DDP or user wrapper).
    """
    if prefix and not model.__dict__.get("_lsparam_load_root", False):
        return  # the load started at a module above this one, which checked it
    for name, module in model.named_modules():
        if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
            parametrization = module.parametrizations.weight[0]
            if isinstance(parametrization, StructuredParametrization):
                layer_prefix = f"{prefix}{name}." if name else prefix
                _check_spec_on_load(parametrization, state_dict, f"{layer_prefix}parametrizations.weight.0.")
                _check_factors_on_load(name, module, state_dict, layer_prefix)


def _check_factors_on_load(name: str, layer: nn.Module, state_dict, prefix: str) -> None:
    parametrizations = layer.parametrizations.weight
    method = parametrizations[0].method
    keys = [f"{prefix}parametrizations.weight.original{i}" for i in range(len(parametrizations[0].factor_names))]
    present = [key for key in keys if key in state_dict]
    if not present and f"{prefix}weight" in state_dict:
        raise ValueError(
            f"state_dict holds a dense weight {prefix}weight for layer {name or '(model)'!r}, which lsparam turned "
            f"into {method} factors: load it into the model before lsparam.parametrize (init='dense' then starts "
            f"each layer from it), or load a state_dict saved from the parametrized model. Nothing was loaded."
        )
    if present and len(present) != len(keys):
        missing = [key for key in keys if key not in state_dict]
        raise ValueError(f"state_dict lacks the {method} factors {missing} of layer {name or '(model)'!r}; nothing was loaded")
    buffers = [f"{prefix}parametrizations.weight.0.{key}" for key in parametrizations[0].state_dict()]
    if present and any(key not in state_dict for key in buffers):
        missing = [key for key in buffers if key not in state_dict]
        raise ValueError(
            f"state_dict has the {method} factors of layer {name or '(model)'!r} but not {missing}: factors "
            f"without the config and index sets they were made with could describe another layer (load "
            f"model.state_dict(), not named_parameters()); nothing was loaded"
        )
    for i, key in enumerate(keys):
        if key not in state_dict:
            continue
        value, factor = state_dict[key], getattr(parametrizations, f"original{i}")
        if tuple(value.shape) != tuple(factor.shape):
            raise ValueError(
                f"state_dict's {key} has shape {tuple(value.shape)}, but layer {name or '(model)'!r} holds "
                f"{tuple(factor.shape)} ({method}, {parametrizations[0].factor_names[i]}); nothing was loaded"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"state_dict's {key} holds NaN or inf values; nothing was loaded")


def _check_spec_on_load(module, state_dict, prefix, *args, **kwargs):
    """Refuse a state_dict whose layer was made with another method, config or shape."""
    key = prefix + "lsparam_spec"
    if key not in state_dict:
        return
    stored = decode_spec(state_dict[key])
    expected = json.dumps(module.spec(), sort_keys=True)
    if stored != expected:
        try:
            stored_obj, expected_obj = json.loads(stored), json.loads(expected)
            _fill_new_config_fields(stored_obj, expected_obj, module.config)
            for spec in (stored_obj, expected_obj):  # fields that need not match (load_ignores)
                if isinstance(spec.get("config"), dict):
                    for name in module.load_ignores:
                        spec["config"].pop(name, None)
            # the same config, saved before its newest fields existed or with other load_ignores values
            if stored_obj == expected_obj:
                state_dict[key] = encode_spec(module.spec())
                return
            diff = _describe_difference(stored_obj, expected_obj)
        except ValueError:
            diff = f"stored {stored!r}"
        raise ValueError(
            f"state_dict for layer {prefix.removesuffix('.parametrizations.weight.0.') or module.layer_name!r} "
            f"was made with another lsparam config: {diff}. Parametrize the model with the same config "
            f"before loading."
        )


def _fill_new_config_fields(stored: dict, expected: dict, config) -> None:
    """Give a spec saved before a config field existed that field's default, when the model uses the default.

    A checkpoint of an earlier lsparam then loads into a model built with the same settings, and is still
    refused when the model sets the new field to anything else.
    """
    stored_fields, expected_fields = stored.get("config"), expected.get("config")
    if not (isinstance(stored_fields, dict) and isinstance(expected_fields, dict) and dataclasses.is_dataclass(config)):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    for name, value in expected_fields.items():
        if name not in stored_fields and name in defaults and defaults[name] == value:
            stored_fields[name] = value


def _describe_difference(stored: dict, expected: dict) -> str:
    def flat(d, pre=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{pre}{k}."))
            else:
                out[pre + k] = v
        return out

    a, b = flat(stored), flat(expected)
    keys = sorted(set(a) | set(b))
    parts = [f"{k}: state_dict has {a.get(k)!r}, model has {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(parts) or "specs differ"


def no_dense_form(method: str) -> NoDenseFormError:
    """The error ``dense`` raises for a weight with a nonlinearity between its factors (``method`` names it)."""
    return NoDenseFormError(
        f"the {method} weight has no dense equivalent (its forward applies a nonlinearity between the "
        f"factors), so it cannot be read as a matrix or merged. Use the layer's forward, or a linear variant."
    )


def remove_structured_weight(layer: nn.Module, dense: nn.Parameter) -> None:
    """Unregister the parametrization of ``layer.weight``, leaving ``dense`` as a plain Parameter.

    ``remove_parametrizations(leave_parametrized=True)`` stores whatever the weight evaluates to; making
    the evaluation return ``dense`` keeps it from wrapping a StructuredWeight in a Parameter.
    """
    parametrization = layer.parametrizations.weight[0]
    parametrization._removal_value = dense
    _own_parametrized_class(layer)
    try:
        torch.nn.utils.parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    finally:
        parametrization._removal_value = None


def _own_parametrized_class(layer: nn.Module) -> None:
    """Give ``layer`` a copy of its parametrized class, used by no other module.

    ``remove_parametrizations`` deletes the weight's property from the module's class, and
    ``copy.deepcopy`` of a parametrized module shares that class with the copy: merging a copy (to export
    it while training goes on) would otherwise take ``weight`` away from the original, and from every
    other copy.
    """
    cls = type(layer)
    own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    layer.__class__ = type(cls.__name__, cls.__bases__, own)
