"""A weight that knows how to multiply itself.

``module.weight`` of a parametrized layer is a :class:`StructuredWeight`: a tensor of the layer's shape
and dtype that holds no dense storage, only references to its factors. ``F.linear`` on it runs the
method's factorised forward (no dense ``out×in`` matrix is built, none is saved for backward); so do
``torch.addmm(bias, x, weight)`` and ``x @ weight`` on the ``in×out`` weight of transformers' ``Conv1D``.
Any other use (user code reading ``.weight``, ``merge``, printing) materialises the dense matrix on demand
through the method's differentiable formula, or raises :class:`NoDenseFormError` for methods that have none.

This is the torchao pattern for quantised weights, applied to structured ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only


class NoDenseFormError(ValueError):
    """Raised when a weight with no dense equivalent (SiLU-LOST) is used as a dense matrix.

    A ``ValueError``: Tensor's binary operators turn a ``TypeError`` into ``NotImplemented``, which
    would hide this message behind "unsupported operand type(s)".
    """


# Metadata reads answered by the wrapper itself, without materialising the dense matrix.
_METADATA_FUNCS = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.stride,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.element_size,
    torch.Tensor.__len__,
    torch.Tensor.shape.__get__,
    torch.Tensor.ndim.__get__,
    torch.Tensor.dtype.__get__,
    torch.Tensor.device.__get__,
    torch.Tensor.layout.__get__,
    torch.Tensor.requires_grad.__get__,
    torch.Tensor.is_cuda.__get__,
    torch.Tensor.is_sparse.__get__,
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
        reference = factors[0]
        shape = (parametrization.out_features, parametrization.in_features)
        return torch.Tensor._make_wrapper_subclass(
            cls,
            shape[::-1] if parametrization.transposed else shape,
            dtype=reference.dtype,
            device=reference.device,
            # The wrapper itself is never part of the autograd graph: gradients flow to the factors
            # through linear() or dense(). Saying requires_grad=False keeps autograd helpers (module
            # trackers, FlopCounterMode, memory profilers) from hooking it, which would materialise W.
            requires_grad=False,
        )

    def __init__(self, parametrization, factors):
        self.parametrization = parametrization
        self.factors = tuple(factors)

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
                y = weight.parametrization.linear(x, *weight.factors)
                return y if bias is None else y + bias
        elif func is torch.addmm or func in _MATMUL_FUNCS:
            y = _transposed_product(func, args, kwargs)
            if y is not None:
                return y
        if func in _METADATA_FUNCS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        # Every other op sees the dense matrix, built through the differentiable formula.
        args, kwargs = tree_map_only(StructuredWeight, StructuredWeight.dense, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only below autograd (torch-function handling disabled): gradients could not reach
        # the factors from here, so refuse rather than compute something silently wrong.
        raise RuntimeError(
            f"lsparam: operator {func} reached a StructuredWeight below autograd; "
            f"call weight.dense() first, or use lsparam.merge(model) for a plain dense model"
        )


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
    y = weight.parametrization.linear(x, *weight.factors)
    if func is not torch.addmm:
        return y
    y = y if alpha == 1 else alpha * y
    return y if beta == 0 else y + (bias if beta == 1 else beta * bias)
