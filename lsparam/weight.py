"""A weight that knows how to multiply itself.

``module.weight`` of a parametrized layer is a :class:`StructuredWeight`: a tensor of the layer's shape
and dtype that holds no dense matrix, only references to its factors. ``F.linear`` on it runs the
method's factorised forward (no dense ``out×in`` matrix is built, none is saved for backward); so do
``torch.addmm(bias, x, weight)`` and ``x @ weight`` on the ``in×out`` weight of transformers' ``Conv1D``.
Any other use (user code reading ``.weight``, ``merge``, printing) materialises the dense matrix on demand
through the method's differentiable formula, or raises :class:`NoDenseFormError` for methods that have none.
Under ``torch.autocast`` (what ``Trainer``'s ``bf16``/``fp16`` use) the factorised product runs as autocast
runs ``F.linear``: in the autocast dtype, with gradients reaching the factors in their own dtype.

It is a ``__torch_function__``-only subclass (no ``__torch_dispatch__``), made with ``as_subclass``: that is
what ``torch.compile`` can build inside a compiled region and see through, so a parametrized model compiles
with no graph break at its weights. (A wrapper subclass, torchao's kind, is made by
``_make_wrapper_subclass``, which Dynamo cannot trace: it broke the graph at every layer.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily
from torch.utils._pytree import tree_map_only


class NoDenseFormError(ValueError):
    """Raised when a weight with no dense equivalent (SiLU-LOST) is used as a dense matrix.

    A ``ValueError``: Tensor's binary operators turn a ``TypeError`` into ``NotImplemented``, which
    would hide this message behind "unsupported operand type(s)".
    """


# Reads answered from the weight's own metadata (shape, dtype, device, ...), without materialising the
# dense matrix. Dynamo reads several of these (is_nested, is_quantized, ...) from a weight it is handed.
_METADATA_FUNCS = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.ndimension,
    torch.Tensor.numel,
    torch.Tensor.nelement,
    # the placeholder's layout, zero strides: what Dynamo's guards read, so it must be the tensor's own
    torch.Tensor.stride,
    torch.Tensor.is_contiguous,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.element_size,
    torch.Tensor.get_device,
    torch.Tensor.is_inference,
    torch.Tensor.__len__,
    torch.Tensor.__hash__,  # identity, as for any tensor (materialising would hash a temporary)
    torch.Tensor.shape.__get__,
    torch.Tensor.ndim.__get__,
    torch.Tensor.dtype.__get__,
    torch.Tensor.device.__get__,
    torch.Tensor.layout.__get__,
    torch.Tensor.itemsize.__get__,
    torch.Tensor.nbytes.__get__,
    torch.Tensor.requires_grad.__get__,
    torch.Tensor.is_cuda.__get__,
    torch.Tensor.is_cpu.__get__,
    torch.Tensor.is_meta.__get__,
    torch.Tensor.is_sparse.__get__,
    torch.Tensor.is_sparse_csr.__get__,
    torch.Tensor.is_quantized.__get__,
    torch.Tensor.is_nested.__get__,
    torch.Tensor.is_mkldnn.__get__,
    torch.Tensor.is_leaf.__get__,
    torch.Tensor.grad.__get__,
    torch.Tensor.grad_fn.__get__,
}

# ``x @ W`` on an ``in×out`` weight (transformers' Conv1D): the factorised forward, as F.linear on ``out×in``.
_MATMUL_FUNCS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}


class StructuredWeight(torch.Tensor):
    """The value of ``module.weight`` for a parametrized layer.

    Args:
        parametrization: the :class:`lsparam.methods.StructuredParametrization` that owns the formula.
        factors: the factor tensors (the parametrization's originals), in the order its methods take.

    Example:
        >>> import torch, lsparam
        >>> layer = torch.nn.Linear(16, 8)
        >>> _ = lsparam.parametrize(layer, lsparam.LowRankConfig(rank=4), target_modules=None)
        >>> w = layer.weight
        >>> type(w).__name__, tuple(w.shape)
        ('StructuredWeight', (8, 16))
        >>> torch.allclose(w.dense(), w.parametrization.dense(*w.factors))
        True
    """

    @staticmethod
    def __new__(cls, parametrization, factors):
        weight = _placeholder(parametrization, factors[0]).as_subclass(cls)
        # Set here, not in __init__: Dynamo traces a subclass's __init__ without its arguments.
        weight.parametrization = parametrization
        weight.factors = tuple(factors)
        return weight

    def dense(self) -> torch.Tensor:
        """The dense matrix in the module's layout (``out×in``; ``in×out`` for ``Conv1D``), differentiable
        with respect to the factors."""
        matrix = self.parametrization.dense(*self.factors)
        return matrix.t() if self.parametrization.transposed else matrix

    def __repr__(self, *, tensor_contents=None):
        name = self.parametrization.method
        head = f"StructuredWeight(method={name!r}, shape={tuple(self.shape)}, dtype={self.dtype})"
        if not self.parametrization.has_dense_form:
            return head
        return f"{head}\n{self.dense()!r}"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(weight, StructuredWeight) and not weight.parametrization.transposed and not isinstance(x, StructuredWeight):
                y = factorised_product(weight, x)
                return y if bias is None else y + bias.to(y.dtype)  # cast as autocast casts F.linear's bias
        elif func is torch.addmm or func in _MATMUL_FUNCS:
            y = _transposed_product(func, args, kwargs)
            if y is not None:
                return y
        if func in _METADATA_FUNCS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        # the tensor an op acts on: its first argument (torch.nn.init's functions pass it as `tensor=`)
        target = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
        if isinstance(target, StructuredWeight):
            if func == _DATA_GET:  # a detached weight, so that `weight.data.normal_()` is refused as well
                return StructuredWeight(target.parametrization, tuple(f.detach() for f in target.factors))
            if _writes_to_self(func):
                raise _lost_write(func, target)
        # Every other op sees the dense matrix, built through the differentiable formula.
        args, kwargs = tree_map_only(StructuredWeight, StructuredWeight.dense, (args, kwargs))
        return func(*args, **kwargs)


_DATA_GET = torch.Tensor.data.__get__
# Writes that are not in-place ops by name (``mul_``, ``copy_``, ``torch.nn.init.normal_``; ``+=`` is add_).
_OTHER_WRITES = {torch.Tensor.data.__set__: "`.data =`", torch.Tensor.__setitem__: "`weight[...] =`"}


def _writes_to_self(func) -> bool:
    name = getattr(func, "__name__", "")
    return func in _OTHER_WRITES or (name.endswith("_") and not name.startswith("__"))


def _lost_write(func, weight: StructuredWeight) -> RuntimeError:
    """Writing into a structured weight would write into a dense copy of it, computed and then dropped."""
    p = weight.parametrization
    where = f"layer {p.layer_name!r}" if p.layer_name else "a parametrized layer"
    name = _OTHER_WRITES.get(func) or f"in-place {func.__name__}"
    factors = f"layer.parametrizations.weight.original0, ... = {list(p.factor_names)}"
    if getattr(func, "__name__", "") == "requires_grad_":
        fix = "Set it on the factors instead: layer.parametrizations.weight.requires_grad_(False) freezes the layer."
    else:
        fix = (f"Assign a new dense weight instead (`layer.weight = W` factorises W as parametrize did, for the "
               f"methods whose init reads the weight), or change the factors ({factors}). A tool merging into the "
               f"weight (PEFT's merge_and_unload) needs lsparam.merge(model) first.")
    return RuntimeError(
        f"{name} on the weight of {where} would be lost: a parametrized layer's weight is computed from its "
        f"factors on each access, not stored. {fix}"
    )


def _placeholder(parametrization, reference: torch.Tensor) -> torch.Tensor:
    """What a weight of ``parametrization`` wraps: one NaN element broadcast to the layer's shape.

    A tensor of the right shape, dtype and device at no memory cost. Every op on the weight goes through
    ``__torch_function__``; one that bypassed it (torch-function handling disabled) would read NaN, not a
    plausible matrix. It does not require grad: gradients flow to the factors through ``linear()`` or
    ``dense()``, and autograd helpers (module trackers, FlopCounterMode, memory profilers) leave it alone
    rather than materialise W. Kept on the parametrization between forwards, as making it costs twice
    what the rest of building the weight does; made afresh while compiling, where it costs nothing at run
    time and a kept one would be a module attribute for Dynamo to guard on.
    """
    shape = (parametrization.out_features, parametrization.in_features)
    shape = shape[::-1] if parametrization.transposed else shape
    if torch.compiler.is_compiling():
        return reference.new_full((), float("nan")).expand(shape)
    kept = getattr(parametrization, "_lsparam_placeholder", None)
    if kept is None or kept.dtype != reference.dtype or kept.device != reference.device or kept.shape != shape:
        # Asked only when remaking it: is_fake costs as much as the rest of building the weight.
        if is_fake(reference):  # shape-only models (memory estimates): a fake cannot become a subclass, a real one can
            with unset_fake_temporarily():
                kept = torch.full((), float("nan"), dtype=reference.dtype, device=reference.device).expand(shape)
        else:
            kept = reference.new_full((), float("nan")).expand(shape)
        parametrization._lsparam_placeholder = kept
    return kept


def _transposed_product(func, args, kwargs):
    """``x @ W`` or ``addmm(bias, x, W)`` for an ``in×out`` structured weight ``W``, factorised; ``None`` for
    any other combination of arguments (those see the dense matrix)."""
    if func is torch.addmm:
        names = ("input", "mat1", "mat2")
        bias, x, weight = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        if set(kwargs) - {*names, "beta", "alpha"}:  # out= and the like: leave them to the dense path
            return None
    else:
        if len(args) != 2 or kwargs:
            return None
        (x, weight), bias = args, None
    if not (isinstance(weight, StructuredWeight) and weight.parametrization.transposed) or isinstance(x, StructuredWeight):
        return None
    if x is None or x.dim() < 1:
        return None
    y = factorised_product(weight, x)
    if func is not torch.addmm:
        return y
    y = y if alpha == 1 else alpha * y
    bias = bias.to(y.dtype)  # autocast would have cast it for addmm; a no-op otherwise (addmm needs one dtype)
    return y if beta == 0 else y + (bias if beta == 1 else beta * bias)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or ``None`` (also where autocast does not apply, as
    on the meta device)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:
        return None


def factorised_product(weight: StructuredWeight, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` (``x W`` for an ``in×out`` weight) through the weight's factors, never a dense ``W``.

    Under autocast it runs as autocast runs ``F.linear``: ``x`` and the floating-point factors cast to the
    autocast dtype and the method's product computed in it, autocast paused inside so that the method's
    own kernels and hand-written backward see one dtype (mixing bfloat16 activations with float32
    factors fails in a GEMM); the factors' gradients come back in their own dtype through the casts.

    Example:
        >>> import lsparam
        >>> layer = torch.nn.Linear(16, 8, bias=False)
        >>> _ = lsparam.parametrize(layer, lsparam.LOSTConfig(rank=4, channel_ratio=0.25), target_modules=None)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     y = layer(torch.randn(2, 16))
        >>> y.dtype, layer.parametrizations.weight.original0.dtype
        (torch.bfloat16, torch.float32)
    """
    dtype = _autocast_dtype(x.device.type)
    if dtype is None:
        return weight.parametrization.linear(x, *weight.factors)

    def low(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    with torch.autocast(x.device.type, enabled=False):
        return weight.parametrization.linear(low(x), *(low(f) for f in weight.factors))
