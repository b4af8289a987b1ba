"""SLTrain: ``W = (alpha / r) · B A + S`` with a fixed random sparse support (Han et al., NeurIPS 2024)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lsparam.config import SLTrainConfig, resolve_rank
from lsparam.methods.base import StructuredParametrization
from lsparam.methods.svd import balanced_factors, svd
from lsparam.sparse.matmul import (
    entry_dots,
    is_shape_only,
    resolve_backend,
    sparse_linear,
    sparse_plus_mm,
)
from lsparam.sparse.support import (
    SparseSupport,
    derived_seed,
    largest_magnitude_flat_indices,
    two_four_flat_indices,
    uniform_flat_indices,
)


def sltrain_nnz(density: float, out_features: int, in_features: int) -> int:
    """Entries of the sparse part: ``floor(density · out · in)``.

    >>> sltrain_nnz(0.03, 512, 1376)
    21135
    """
    return math.floor(density * (out_features * in_features))  # one rounding, whatever the shape


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · (a @ b)`` with the scale applied inside the GEMM (BLAS's alpha), not as an extra pass."""
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=scale)


class _GatherSLTrainLinear(torch.autograd.Function):
    """``y = (x Aᵀ)(s·B)ᵀ + x Sᵀ`` on the gather path, as one autograd function.

    The sparse product is written first and the low-rank GEMM adds into it (its beta = 1), in the forward
    and for the input gradient: no token×features temporaries, no extra add passes, and no pass reading
    the GEMM's output back. The scale ``s`` rides in the GEMMs' alpha: no ``s·B`` copy is made or saved;
    only ``x`` and ``x Aᵀ`` are saved.
    """

    @staticmethod
    def forward(ctx, x, B, A, values, support: SparseSupport, scale: float):
        x2 = x.reshape(-1, x.shape[-1])
        hidden = x2 @ A.t()
        y = sparse_plus_mm(x2, values, support, hidden, B.t(), scale)
        ctx.support, ctx.scale = support, scale
        ctx.save_for_backward(x, B, A, values, hidden)
        return y.reshape(*x.shape[:-1], support.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, B, A, values, hidden = ctx.saved_tensors
        support, scale = ctx.support, ctx.scale
        g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad_B = grad_A = grad_values = None
        grad_hidden = _scaled_mm(g2, B, scale)
        if ctx.needs_input_grad[1]:
            grad_B = _scaled_mm(g2.t(), hidden, scale)
        if ctx.needs_input_grad[2]:
            grad_A = grad_hidden.t() @ x2
        if ctx.needs_input_grad[0]:
            grad_x = sparse_plus_mm(g2, values, support, grad_hidden, A, 1.0, transposed=True).reshape(x.shape)
        if ctx.needs_input_grad[3]:
            grad_values = entry_dots(g2, x2, support)
        return grad_x, grad_B, grad_A, grad_values, None, None


class SLTrainParametrization(StructuredParametrization):
    """Factors ``B`` (out×r), ``A`` (r×in) and ``values`` (nnz) on a fixed support.

    ``init="random"`` follows the paper: ``B = 0``, ``A`` and the values uniform in ``±1/√in``, so the
    layer starts as its sparse part. ``init="dense"`` factorises the current weight: top-r SVD for
    ``s·B A`` and its largest-magnitude residual entries as the support (continued pretraining).
    """

    method = "sltrain"
    factor_names = ("B", "A", "values")
    factor_roles = ("lowrank_out", "lowrank_in", "sparse")

    def __init__(
        self, config: SLTrainConfig, out_features: int, in_features: int, layer_name: str = "", *, on_meta: bool = False
    ):
        self.rank = resolve_rank(config.rank, out_features, in_features, layer=layer_name)
        nnz = sltrain_nnz(config.density, out_features, in_features)
        if nnz < 1:
            raise ValueError(
                f"density={config.density} gives no sparse entry for layer {layer_name!r} of shape "
                f"{out_features}x{in_features}; use density >= {1 / (out_features * in_features):.3g}"
            )
        super().__init__(config, out_features, in_features, layer_name)
        self.scale = config.alpha / self.rank
        shape = (out_features, in_features)
        if on_meta:  # shapes only (memory estimates): drawing a support would cost time for nothing
            flat = None
        elif config.init == "random":
            flat = self._drawn_support()
        else:  # "dense": chosen from the weight in init_factors; a placeholder until then
            flat = torch.arange(nnz)
        # A random support is regenerated from the seed, so it is kept out of the state_dict.
        self.support = SparseSupport(flat, shape, persistent=config.init == "dense", nnz=nnz)

    def spec(self) -> dict:
        # the random support depends on the layer's name: a state_dict from a layer of another name
        # (e.g. a model parametrized from another root module) would load onto a different support
        spec = super().spec()
        if self.config.init == "random":
            spec["support_name"] = self.layer_name
        return spec

    def _drawn_support(self) -> torch.Tensor:
        """The support ``init="random"`` draws from (seed, layer name, shape): 2:4, or uniform."""
        shape = (self.out_features, self.in_features)
        if self.config.sparse_backend == "semi-structured":
            return two_four_flat_indices(*shape, self._seed("support"))
        return uniform_flat_indices(shape[0] * shape[1], sltrain_nnz(self.config.density, *shape), self._seed("support"))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # A drawn support is not in the state_dict. After `to_empty` (a model built on the meta device, as
        # FSDP and accelerate do) its buffers hold uninitialised memory, which the kernels would read out
        # of bounds: draw it again, as at construction (checked first: drawing costs a permutation of out·in).
        if self.config.init == "random" and not self.support.holds_valid_csr():
            self.support.reset(self._drawn_support())

    def _seed(self, purpose: str) -> int:
        return derived_seed(self.config.seed, self.layer_name, self.out_features, self.in_features, purpose)

    def nnz(self) -> int:
        return self.support.nnz

    def index_bytes(self, device="cpu", dtype=torch.float32) -> int:
        """The CSR arrays (int32 row pointers, 16-bit columns up to 65,536 wide: see
        :func:`~lsparam.sparse.support.column_dtype`), plus, on the CSR path, the int32 transposed CSR and
        its permutation it keeps for ``dX``. The gather path makes its transpose for each backward, and
        the routes on PyTorch's sparse ops an int32 copy of the columns for each call: transients, not
        counted."""
        support = self.support
        total = sum(t.numel() * t.element_size() for t in (support.crow_indices, support.col_indices))
        backend = self.config.sparse_backend
        if backend == "auto":
            backend = resolve_backend("auto", torch.device(device), dtype, self.config.density)
        if backend == "csr":
            total += 4 * (2 * support.nnz + support.shape[1] + 1)
        return total

    def init_reads_weight(self) -> bool:
        return self.config.init == "dense"

    def init_factors(self, weight):
        if self.config.init == "random":
            generator = torch.Generator().manual_seed(self._seed("init"))
            bound = 1.0 / math.sqrt(self.in_features)
            A = torch.empty(self.rank, self.in_features).uniform_(-bound, bound, generator=generator)
            B = torch.zeros(self.out_features, self.rank)
            values = torch.empty(self.support.nnz).uniform_(-bound, bound, generator=generator)
            return B, A, values
        U, S, Vh = svd(weight)
        B, A = balanced_factors(U, S, Vh, self.rank)
        B, A = B / math.sqrt(self.scale), A / math.sqrt(self.scale)
        residual = weight.detach().to(B.dtype) - self.scale * (B @ A)
        flat = largest_magnitude_flat_indices(residual, self.support.nnz)
        self.support.reset(flat)
        return B, A, residual.reshape(-1)[flat.to(residual.device)]

    def dense(self, B, A, values):
        return self.scale * (B @ A) + self.support.to_dense(values)

    def backend_for(self, x: torch.Tensor) -> str:
        if is_shape_only(x):  # memory estimates: the scatter path has shape kernels and saves the same tensors
            return "scatter"
        return resolve_backend(self.config.sparse_backend, x.device, x.dtype, self.config.density)

    def linear(self, x, B, A, values):
        backend = self.backend_for(x)
        if backend == "gather":
            return _GatherSLTrainLinear.apply(x, B, A, values, self.support, self.scale)
        # the scale on the r-wide hidden, not on B: backward then keeps no out×r copy s·B
        low_rank = F.linear(F.linear(x, A) * self.scale, B)
        return low_rank + sparse_linear(x, values, self.support, backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, nnz={self.nnz()}, scale={self.scale:g}"


def build(config: SLTrainConfig, layer: torch.nn.Linear, name: str) -> SLTrainParametrization:
    return SLTrainParametrization(config, layer.out_features, layer.in_features, name, on_meta=is_shape_only(layer.weight))
