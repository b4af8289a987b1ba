"""LOST: SVD-initialised low-rank plus channel-wise sparse weights (Li et al., 2025)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lsparam.config import DENSE_INIT, LOSTConfig, resolve_rank
from lsparam.methods.base import StructuredParametrization, no_dense_form
from lsparam.methods.svd import balanced_factors, svd


def lost_channels(channel_ratio: float, in_features: int) -> int:
    """Input channels kept in the sparse part: ``max(1, floor(ρ · in))``.

    >>> lost_channels(0.05, 512)
    25
    """
    return max(1, int(math.floor(channel_ratio * in_features)))


class _LOSTLinear(torch.autograd.Function):
    """``y = [φ(x Aᵀ), x_I] [γ B, (1-γ) W_s]ᵀ``: both paths in one GEMM, with a hand-written backward.

    Against autograd on the same ops it saves the concatenated weight's copy (rebuilt in backward from
    the factors) and, for ``dX``, adds the kept channels' gradient into ``dφ A`` in place instead of
    scattering it into a zero-filled ``x``-sized tensor and adding that.
    """

    @staticmethod
    def forward(ctx, x, B, A, sparse, channels, gamma: float, silu: bool):
        pre = F.linear(x, A)
        hidden = F.silu(pre) if silu else pre
        inputs = torch.cat([hidden, x.index_select(-1, channels)], dim=-1)
        ctx.gamma, ctx.silu = gamma, silu
        ctx.save_for_backward(x, B, A, sparse, channels, inputs, pre if silu else None)
        return F.linear(inputs, _joint_weight(B, sparse, gamma))

    @staticmethod
    def backward(ctx, grad_out):
        x, B, A, sparse, channels, inputs, pre = ctx.saved_tensors
        gamma, rank = ctx.gamma, A.shape[0]
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_B = grad_A = grad_sparse = None
        grad_inputs = g2 @ _joint_weight(B, sparse, gamma)  # (T, r + m)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_weight = g2.t() @ inputs.reshape(-1, inputs.shape[-1])
            grad_B, grad_sparse = gamma * grad_weight[:, :rank], (1.0 - gamma) * grad_weight[:, rank:]
        grad_pre = grad_inputs[:, :rank]
        if ctx.silu:
            sig = torch.sigmoid(pre.reshape(-1, rank))
            grad_pre = grad_pre * (sig * (1 + pre.reshape(-1, rank) * (1 - sig)))
        if ctx.needs_input_grad[2]:
            grad_A = grad_pre.t() @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = (grad_pre @ A).index_add_(-1, channels, grad_inputs[:, rank:]).reshape(x.shape)
        return grad_x, grad_B, grad_A, grad_sparse, None, None, None


def _joint_weight(B: torch.Tensor, sparse: torch.Tensor, gamma: float) -> torch.Tensor:
    return torch.cat([gamma * B, (1.0 - gamma) * sparse], dim=1)


class LOSTParametrization(StructuredParametrization):
    """Factors ``B`` (out×r), ``A`` (r×in) and ``sparse`` (out×m, the kept input channels).

    Forward: ``y = γ · φ(x Aᵀ) Bᵀ + (1 − γ) · x[..., I] W_sᵀ``; φ is the identity (linear LOST, a
    matrix ``W = γ B A + (1 − γ) S_cols``) or SiLU (no dense form). The channel index ``I`` is a buffer
    chosen once from the layer's weight at initialisation.
    """

    method = "lost"
    factor_names = ("B", "A", "sparse")
    factor_roles = ("lowrank_out", "lowrank_in", "sparse")
    no_dense_reason = "a nonlinearity sits between its factors"  # shown when activation is not None

    def __init__(self, config: LOSTConfig, out_features: int, in_features: int, layer_name: str = ""):
        self.rank = resolve_rank(config.rank, out_features, in_features, layer=layer_name)
        super().__init__(config, out_features, in_features, layer_name)
        self.gamma = float(config.gamma)
        self.has_dense_form = config.activation is None
        m = lost_channels(config.channel_ratio, in_features)
        self.register_buffer("channels", torch.arange(m, dtype=torch.int64))

    def nnz(self) -> int:
        return self.channels.numel() * self.out_features

    def index_bytes(self, device="cpu", dtype=torch.float32) -> int:
        return self.channels.numel() * self.channels.element_size()

    def init_factors(self, weight):
        if self.config.init == DENSE_INIT:
            return self._closest_factors(weight)
        U, S, Vh = svd(weight)
        B, A = balanced_factors(U, S, Vh, self.rank)
        original = weight.detach().to(B.dtype)
        if self.config.residual_window is None:
            residual = original - B @ A  # the whole spectrum below r
        else:
            window = slice(self.rank, self.rank + self.config.residual_window)
            residual = (U[:, window] * S[window]) @ Vh[window]
        channels = self._keep_channels(residual)
        source = original if self.config.sparse_init == "original" else residual
        return B, A, source[:, channels]

    def _closest_factors(self, weight):
        """``init="dense"``: ``γ·B A`` is the top-r SVD of ``weight`` and ``(1 − γ)·W_s`` the residual on the
        channels where it is largest, so the layer starts as close to ``weight`` as low-rank alone or closer.

        With γ = 0 the low-rank path contributes nothing (the channels are chosen on ``weight`` itself); with
        γ = 1 the sparse path contributes nothing (``W_s`` then holds the unscaled residual, which the forward
        multiplies by 0).
        """
        gamma = self.gamma
        B, A = balanced_factors(*svd(weight), self.rank)
        original = weight.detach().to(B.dtype)
        if gamma > 0.0:
            truncated = B @ A
            residual = original - truncated
            B, A = B / math.sqrt(gamma), A / math.sqrt(gamma)  # γ·B A is the truncated SVD
            if not bool(torch.isfinite(truncated / gamma).all()):  # = B A now, without a second product
                raise ValueError(
                    f"gamma={gamma!r} is too small for init='dense' on layer {self.layer_name!r}: B A must carry "
                    f"1/gamma to reproduce the truncated SVD, which overflows. Use gamma=0 (no low-rank path) or a "
                    f"larger gamma."
                )
        else:
            residual = original
        channels = self._keep_channels(residual)
        sparse = residual[:, channels]
        return B, A, sparse / (1.0 - gamma) if gamma < 1.0 else sparse

    def _keep_channels(self, residual):
        """The ``m`` input channels of largest residual column norm, sorted, stored in the ``channels`` buffer."""
        channels = residual.norm(dim=0).topk(self.channels.numel()).indices.sort().values
        self.channels.copy_(channels)
        return channels

    def dense(self, B, A, sparse):
        if not self.has_dense_form:
            raise no_dense_form("LOST (activation='silu')")
        return (self.gamma * B @ A).index_add(1, self.channels, (1.0 - self.gamma) * sparse)

    def linear(self, x, B, A, sparse):
        return _LOSTLinear.apply(x, B, A, sparse, self.channels, self.gamma, self.config.activation == "silu")

    def extra_repr(self) -> str:
        act = self.config.activation or "linear"
        return f"{super().extra_repr()}, rank={self.rank}, channels={self.channels.numel()}, gamma={self.gamma:g}, {act}"


def build(config: LOSTConfig, layer: torch.nn.Linear, name: str) -> LOSTParametrization:
    return LOSTParametrization(config, layer.out_features, layer.in_features, name)
