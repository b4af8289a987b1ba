"""CoLA: ``y = B σ(A x)``, a low-rank bottleneck with a nonlinearity (Liu et al., EMNLP 2025)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsparam.config import CoLAConfig, resolve_rank
from lsparam.methods.base import StructuredParametrization, no_dense_form
from lsparam.sparse.matmul import is_shape_only
from lsparam.sparse.support import derived_seed

# name: (σ, (grad of σ(p), p) -> grad of p), the fused ATen backward kernels autograd itself uses
_ACTIVATIONS = {
    "silu": (F.silu, torch.ops.aten.silu_backward),
    "gelu": (F.gelu, lambda grad, pre: torch.ops.aten.gelu_backward(grad, pre)),
    "relu": (F.relu, lambda grad, pre: torch.ops.aten.threshold_backward(grad, pre, 0)),
}


def cola_init_std(rank: int, out_features: int, in_features: int) -> float:
    """Standard deviation of each factor entry at init: ``r^(-1/4) · (in + out)^(-1/4)``.

    Each entry of ``B A`` is then a sum of ``r`` products of two such entries, so its standard deviation is
    ``√r · r^(-1/2) · (in + out)^(-1/2) = 1/√(in + out)``.

    >>> s = cola_init_std(128, 512, 512)
    >>> round(s, 4), round(128 * s**4 * (512 + 512), 6)  # B A's variance times (in + out)
    (0.0526, 1.0)
    """
    return rank ** -0.25 * (in_features + out_features) ** -0.25


class _CoLALinear(torch.autograd.Function):
    """``y = σ(x Aᵀ) Bᵀ`` with a hand-written backward that keeps at most ``x Aᵀ``.

    Autograd on the same ops would save both ``x Aᵀ`` (for σ') and ``σ(x Aᵀ)`` (for ``dB``): ``2r`` values
    per token. This saves ``x Aᵀ`` only and reapplies σ in backward; with ``recompute`` it saves nothing
    but the input and the factors (tensors that exist anyway) and recomputes ``x Aᵀ`` as well.
    """

    @staticmethod
    def forward(ctx, x, B, A, activation: str, recompute: bool):
        pre = F.linear(x, A)
        y = F.linear(_ACTIVATIONS[activation][0](pre), B)
        ctx.activation = activation
        ctx.save_for_backward(x, B, A, None if recompute else pre)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, B, A, pre = ctx.saved_tensors
        act, act_backward = _ACTIVATIONS[ctx.activation]
        # under autocast x and the factors arrive already cast (lsparam.weight.factorised_product), so a
        # recomputed x Aᵀ has the forward's precision
        if pre is None:
            pre = F.linear(x, A)
        rank = pre.shape[-1]
        g2, pre2 = grad_out.reshape(-1, grad_out.shape[-1]), pre.reshape(-1, rank)
        grad_x = grad_B = grad_A = None
        if ctx.needs_input_grad[1]:
            grad_B = g2.t() @ act(pre2)
        grad_pre = act_backward(g2 @ B, pre2)
        if ctx.needs_input_grad[2]:
            grad_A = grad_pre.t() @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = (grad_pre @ A).reshape(x.shape)
        return grad_x, grad_B, grad_A, None, None


class CoLAParametrization(StructuredParametrization):
    """Factors ``B`` (out×r) and ``A`` (r×in); the forward is ``y = σ(x Aᵀ) Bᵀ`` (plus the layer's bias).

    ``r·(in + out)`` parameters and multiply-adds per token, like low-rank; σ between the factors means
    the weight is no matrix (``dense`` raises ``NoDenseFormError``, ``merge`` refuses).
    """

    method = "cola"
    factor_names = ("B", "A")
    factor_roles = ("lowrank_out", "lowrank_in")
    has_dense_form = False
    no_dense_reason = "a nonlinearity sits between its factors"
    load_ignores = ("checkpoint", "seed")  # how backward runs, and an init the loaded factors replace

    def __init__(self, config: CoLAConfig, out_features: int, in_features: int, layer_name: str = ""):
        self.rank = resolve_rank(config.rank, out_features, in_features, layer=layer_name)
        super().__init__(config, out_features, in_features, layer_name)

    def init_reads_weight(self) -> bool:
        return False

    def init_factors(self, weight):
        """The paper's init: normal entries of std :func:`cola_init_std`; ``weight`` gives only the shape.

        Drawn in float32 on the CPU from a generator seeded from ``(seed, layer name, shape)``, so the same
        config gives the same factors on any device and in any dtype (up to rounding).
        """
        shapes = ((self.out_features, self.rank), (self.rank, self.in_features))
        if is_shape_only(weight):  # memory estimates: no values to draw
            return tuple(torch.empty(shape) for shape in shapes)
        seed = derived_seed(self.config.seed, self.layer_name, self.out_features, self.in_features, "init")
        generator = torch.Generator().manual_seed(seed)
        std = cola_init_std(self.rank, self.out_features, self.in_features)
        return tuple(torch.randn(shape, generator=generator) * std for shape in shapes)

    def dense(self, B, A):
        raise no_dense_form(f"CoLA (activation={self.config.activation!r})")

    def linear(self, x, B, A):
        return _CoLALinear.apply(x, B, A, self.config.activation, self.config.checkpoint)

    def extra_repr(self) -> str:
        recompute = ", checkpoint" if self.config.checkpoint else ""
        return f"{super().extra_repr()}, rank={self.rank}, {self.config.activation}{recompute}"


def build(config: CoLAConfig, layer: torch.nn.Linear, name: str) -> CoLAParametrization:
    return CoLAParametrization(config, layer.out_features, layer.in_features, name)


__all__ = ["CoLAParametrization", "build", "cola_init_std"]
