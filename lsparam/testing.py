"""Property tests for structured decompositions, as ``torch.testing`` is for tensors.

- Strategies (hypothesis, imported lazily): :func:`linear_layers`, :func:`configs`.
- Checker: :func:`assert_decomposition` verifies each parametrized layer of a module against
  *independent* dense float64 math: the materialised weight against the method's published formula,
  the factorised forward and its gradients against autograd through that formula (plus ``gradcheck``),
  merge exactness, parameter counts and the sparse-support invariants.

Built-in methods have reference formulas written here, separately from their implementation. A method
added with :func:`lsparam.register_method` is checked against its own ``dense`` (the formula it
declares), so its fast ``linear`` and its gradients are still verified.

Example:
    >>> import torch, lsparam
    >>> from lsparam.testing import assert_decomposition
    >>> layer = torch.nn.Linear(24, 16)
    >>> _ = lsparam.parametrize(layer, lsparam.SLTrainConfig(rank=4, density=0.1), target_modules=None)
    >>> assert_decomposition(layer)  # raises AssertionError with the failing property otherwise
"""

from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from lsparam.api import merge, structured_layers
from lsparam.config import CoLAConfig, LOSTConfig, LowRankConfig, SLTrainConfig
from lsparam.methods.base import StructuredParametrization
from lsparam.methods.cola import CoLAParametrization
from lsparam.methods.lost import LOSTParametrization
from lsparam.methods.lowrank import LowRankParametrization
from lsparam.methods.sltrain import SLTrainParametrization, sltrain_nnz
from lsparam.sparse.support import column_dtype

__all__ = ["assert_decomposition", "configs", "linear_layers", "reference_forward", "reference_weight"]

# Layers drawn by linear_layers() are at least this wide, so every config drawn by configs() fits them.
MIN_FEATURES = 4


# ---- strategies ---------------------------------------------------------------------------------
def linear_layers(min_features: int = MIN_FEATURES, max_features: int = 32, dtypes=(torch.float64,), bias=None):
    """A hypothesis strategy of ``nn.Linear`` layers with random shapes and weights.

    Args:
        min_features, max_features: bounds of ``in_features`` and ``out_features``.
        dtypes: dtypes to draw from (float64 makes exactness checks meaningful).
        bias: True/False, or None to draw it.

    Example:
        >>> from hypothesis import given
        >>> @given(layer=linear_layers(max_features=8))
        ... def test_shape(layer):
        ...     assert 4 <= layer.in_features <= 8
        >>> test_shape()
    """
    from hypothesis import strategies as st

    if min_features < 1 or max_features < min_features:
        raise ValueError(f"need 1 <= min_features <= max_features; got {min_features}, {max_features}")

    @st.composite
    def build(draw):
        out_features = draw(st.integers(min_features, max_features))
        in_features = draw(st.integers(min_features, max_features))
        dtype = draw(st.sampled_from(list(dtypes)))
        with_bias = draw(st.booleans()) if bias is None else bias
        seed = draw(st.integers(0, 2**31 - 1))
        generator = torch.Generator().manual_seed(seed)
        layer = nn.Linear(in_features, out_features, bias=with_bias, dtype=dtype)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(in_features)
            layer.weight.copy_(torch.empty(out_features, in_features).uniform_(-bound, bound, generator=generator))
            if with_bias:
                layer.bias.copy_(torch.empty(out_features).uniform_(-bound, bound, generator=generator))
        return layer

    return build()


def configs(methods=("lowrank", "sltrain", "lost", "cola")):
    """A hypothesis strategy of valid configs for the named built-in methods.

    Every config drawn fits any layer with both sides at least ``MIN_FEATURES`` (4): ranks are an int in
    [1, 3] or a fraction in [0.25, 0.75]; SLTrain densities are at least 0.1 (so 16 weights give one entry).

    Example:
        >>> from hypothesis import given
        >>> @given(config=configs(methods=("lost",)))
        ... def test_kind(config):
        ...     assert isinstance(config, LOSTConfig)
        >>> test_kind()
    """
    from hypothesis import strategies as st

    known = {"lowrank", "sltrain", "lost", "cola"}
    unknown = set(methods) - known
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {sorted(known)}; got {methods!r}")
    rank = st.one_of(st.integers(1, 3), st.floats(0.25, 0.75))
    fraction = st.floats(0.0, 1.0)
    strategies = {
        "lowrank": st.builds(LowRankConfig, rank=rank),
        "sltrain": st.builds(
            SLTrainConfig,
            rank=rank,
            density=st.floats(0.1, 1.0),
            alpha=st.floats(1.0, 64.0),
            seed=st.integers(0, 2**16),
            sparse_backend=st.sampled_from(["auto", "gather", "csr", "scatter"]),
            init=st.sampled_from(["random", "dense"]),
        ),
        "lost": st.one_of(
            st.builds(
                LOSTConfig,
                rank=rank,
                channel_ratio=st.floats(0.01, 1.0),
                gamma=fraction,
                activation=st.sampled_from([None, "silu"]),
                residual_window=st.one_of(st.none(), st.integers(1, 4)),
                sparse_init=st.sampled_from(["original", "residual"]),
            ),
            # init="dense" scales B A by 1/γ: a subnormal γ overflows (refused), so draw 0 or a normal γ
            st.builds(LOSTConfig, rank=rank, channel_ratio=st.floats(0.01, 1.0),
                      gamma=st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), init=st.just("dense")),
        ),
        "cola": st.builds(CoLAConfig, rank=rank, activation=st.sampled_from(["silu", "gelu", "relu"]),
                          checkpoint=st.booleans(), seed=st.integers(0, 2**16)),
    }
    return st.one_of(*(strategies[m] for m in methods))


# ---- independent reference formulas (dense float64 math) ----------------------------------------
def _column_selector(channels: torch.Tensor, in_features: int) -> torch.Tensor:
    """``P`` (in×m) with ``P[I[k], k] = 1``, so ``x[..., I] == x @ P``."""
    selector = torch.zeros(in_features, channels.numel(), dtype=torch.float64)
    selector[channels.cpu(), torch.arange(channels.numel())] = 1.0
    return selector


def _sparse_dense(parametrization: SLTrainParametrization, values: torch.Tensor) -> torch.Tensor:
    """``S = R diag(v) Cᵀ`` with one-hot row and column matrices read off the CSR arrays (differentiable)."""
    support = parametrization.support
    crow = support.crow_indices.cpu().tolist()
    rows = [row for row in range(support.shape[0]) for _ in range(crow[row + 1] - crow[row])]
    cols = support.col_indices.cpu().tolist()
    nnz = len(cols)
    row_hot = torch.zeros(support.shape[0], nnz, dtype=torch.float64)
    col_hot = torch.zeros(support.shape[1], nnz, dtype=torch.float64)
    row_hot[rows, range(nnz)] = 1.0
    col_hot[cols, range(nnz)] = 1.0
    return (row_hot * values) @ col_hot.T


def reference_weight(parametrization: StructuredParametrization, factors) -> torch.Tensor | None:
    """The dense float64 matrix of a built-in method's published formula (``None`` if none exists)."""
    f = [t.detach().cpu().to(torch.float64) for t in factors]
    if isinstance(parametrization, LowRankParametrization):
        B, A = f
        return B @ A
    if isinstance(parametrization, SLTrainParametrization):
        B, A, values = f
        return (parametrization.config.alpha / parametrization.rank) * (B @ A) + _sparse_dense(parametrization, values)
    if isinstance(parametrization, CoLAParametrization):
        return None  # a nonlinearity between the factors: no matrix
    if isinstance(parametrization, LOSTParametrization):
        if parametrization.config.activation is not None:
            return None
        B, A, sparse = f
        gamma = parametrization.config.gamma
        selector = _column_selector(parametrization.channels, parametrization.in_features)
        return gamma * (B @ A) + (1 - gamma) * (sparse @ selector.T)
    # A user method: its declared formula is the reference.
    if not parametrization.has_dense_form:
        return None
    with torch.no_grad():
        return parametrization.dense(*factors).detach().cpu().to(torch.float64)


def reference_forward(parametrization: StructuredParametrization, factors, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` by the published formula, differentiable in ``x`` and ``factors`` (all float64, CPU)."""
    if isinstance(parametrization, LOSTParametrization):
        B, A, sparse = factors
        gamma = parametrization.config.gamma
        hidden = x @ A.T
        if parametrization.config.activation == "silu":
            hidden = hidden * torch.sigmoid(hidden)  # SiLU written out
        selector = _column_selector(parametrization.channels, parametrization.in_features)
        return gamma * hidden @ B.T + (1 - gamma) * (x @ selector) @ sparse.T
    if isinstance(parametrization, CoLAParametrization):
        B, A = factors
        hidden = x @ A.T
        activation = parametrization.config.activation
        if activation == "silu":
            hidden = hidden * torch.sigmoid(hidden)
        elif activation == "gelu":
            hidden = hidden * 0.5 * (1 + torch.erf(hidden / math.sqrt(2)))  # the exact (erf) GELU
        else:
            hidden = hidden.clamp(min=0)
        return hidden @ B.T
    if isinstance(parametrization, SLTrainParametrization):
        B, A, values = factors
        scale = parametrization.config.alpha / parametrization.rank
        return x @ (scale * (B @ A) + _sparse_dense(parametrization, values)).T
    if isinstance(parametrization, LowRankParametrization):
        B, A = factors
        return x @ (B @ A).T
    return x @ parametrization.dense(*factors).T


# ---- the checker ---------------------------------------------------------------------------------
def _close(actual, expected, what: str, name: str, atol: float, rtol: float) -> None:
    actual = actual.detach().cpu().to(torch.float64)
    expected = expected.detach().cpu().to(torch.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"layer {name!r}: {what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        err = (actual - expected).abs().max().item()
        raise AssertionError(f"layer {name!r}: {what} differs from the reference (max abs error {err:.3g})")


def _check_counts_and_support(name: str, p: StructuredParametrization, factors) -> None:
    out_f, in_f = p.out_features, p.in_features
    count = sum(f.numel() for f in factors)
    if isinstance(p, (LowRankParametrization, SLTrainParametrization, LOSTParametrization, CoLAParametrization)):
        rank = p.config.rank  # the documented rule, not resolve_rank: an int as it is, a fraction of min rounded down
        r = int(rank) if isinstance(rank, numbers.Integral) else math.floor(rank * min(out_f, in_f))
        if (tuple(factors[0].shape), tuple(factors[1].shape)) != ((out_f, r), (r, in_f)):
            raise AssertionError(f"layer {name!r}: B {tuple(factors[0].shape)} and A {tuple(factors[1].shape)}, "
                                 f"expected ({out_f}, {r}) and ({r}, {in_f}) for rank={rank!r}")
        expected = r * (in_f + out_f)
        if isinstance(p, SLTrainParametrization):
            nnz = p.support.nnz
            if p.config.sparse_backend != "semi-structured" and nnz != sltrain_nnz(p.config.density, out_f, in_f):
                raise AssertionError(f"layer {name!r}: nnz {nnz} != floor(density*out*in)")
            flat = p.support.flat_indices()
            if flat.numel() != nnz or (flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all())):
                raise AssertionError(f"layer {name!r}: support indices are not unique and sorted")
            if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < out_f * in_f):
                raise AssertionError(f"layer {name!r}: support index out of range")
            want = column_dtype(in_f)
            if p.support.col_indices.dtype != want or p.support.crow_indices.dtype != torch.int32:
                raise AssertionError(f"layer {name!r}: support columns are {p.support.col_indices.dtype} (want {want}), "
                                     f"row pointers {p.support.crow_indices.dtype} (want torch.int32)")
            if p.config.init == "random":
                regenerated = type(p)(p.config, out_f, in_f, p.layer_name).support
                if not torch.equal(regenerated.col_indices, p.support.col_indices.cpu()) or not torch.equal(
                    regenerated.crow_indices, p.support.crow_indices.cpu()
                ):
                    raise AssertionError(f"layer {name!r}: support does not regenerate from (seed, name, shape)")
            expected += nnz
        if isinstance(p, LOSTParametrization):
            m = max(1, math.floor(p.config.channel_ratio * in_f))
            channels = p.channels.cpu()
            if channels.numel() != m or not bool((channels[1:] > channels[:-1]).all()):
                raise AssertionError(f"layer {name!r}: {channels.numel()} channels (expected {m}), unique and sorted")
            if int(channels.min()) < 0 or int(channels.max()) >= in_f:
                raise AssertionError(f"layer {name!r}: channel index out of range")
            expected += m * out_f
        if count != expected:
            raise AssertionError(f"layer {name!r}: {count} factor parameters, expected {expected}")


def assert_decomposition(module: nn.Module, *, atol: float = 1e-8, rtol: float = 1e-6, tokens: int = 5, seed: int = 0,
                         gradcheck: bool = True, perturb: bool = True) -> None:
    """Check every lsparam-parametrized layer of ``module``; raise ``AssertionError`` on the first failure.

    Works on a float64 copy (the module itself is not changed). With ``perturb`` (the default) every factor
    of the copy first gets Gaussian noise of half its own RMS (or of ``1/√cols`` where it is all zeros): a
    factor that starts at zero, as SLTrain's ``B`` does, would otherwise make the gradients that pass
    through it zero in the method and in the reference alike, and hide a wrong one. Per layer:

    1. the materialised weight equals the method's formula computed independently;
    2. the forward equals ``x`` times the formula, and its gradients (input and factors) equal autograd
       through the formula; with ``gradcheck``, ``torch.autograd.gradcheck`` on the forward too;
    3. ``merge`` gives back the layer's own class and reproduces the materialised weight and the forward
       exactly (methods with a dense form);
    4. parameter counts (``r(in+out) + nnz``, ``r(in+out) + m·out``) and support invariants (SLTrain:
       ``floor(δ·out·in)`` unique sorted indices regenerated from the seed (uint16 columns up to 65,536 wide); LOST: ``m`` sorted channels).

    Example:
        >>> import torch, lsparam
        >>> layer = torch.nn.Linear(12, 10)
        >>> _ = lsparam.parametrize(layer, lsparam.LOSTConfig(rank=3, activation="silu"), target_modules=None)
        >>> assert_decomposition(layer)
    """
    layers = structured_layers(module)
    if not layers:
        raise AssertionError("no lsparam-parametrized layer found in the module")
    generator = torch.Generator().manual_seed(seed)
    for name, (layer, _) in layers.items():
        layer64 = copy.deepcopy(layer).to(device="cpu", dtype=torch.float64)
        p = layer64.parametrizations.weight[0]
        factors = _originals(layer64)
        _check_counts_and_support(name, p, factors)
        if perturb:
            _add_noise(factors, generator)

        expected_weight = reference_weight(p, factors)
        weight = layer64.weight
        if expected_weight is not None:
            materialised = weight.dense().t() if p.transposed else weight.dense()  # the method's out×in
            _close(materialised, expected_weight, "materialised weight", name, atol, rtol)

        x = torch.randn(2, tokens, p.in_features, dtype=torch.float64, generator=generator, requires_grad=True)
        upstream = torch.randn(2, tokens, p.out_features, dtype=torch.float64, generator=generator)
        # the product the module's own forward uses: F.linear, or x @ W for an in×out (Conv1D) weight
        y = x @ weight if p.transposed else F.linear(x, weight)
        ref_x = x.detach().clone().requires_grad_(True)
        ref_factors = tuple(f.detach().clone().requires_grad_(True) for f in factors)
        y_ref = reference_forward(p, ref_factors, ref_x)
        _close(y, y_ref, "forward", name, atol, rtol)
        grads = torch.autograd.grad(y, (x, *factors), upstream, allow_unused=True)
        ref_grads = torch.autograd.grad(y_ref, (ref_x, *ref_factors), upstream, allow_unused=True)
        labels = ("input", *(p.factor_names or [f"factor {i}" for i in range(len(factors))]))
        for label, g, g_ref in zip(labels, grads, ref_grads):
            g = torch.zeros_like(g_ref) if g is None else g
            g_ref = torch.zeros_like(g) if g_ref is None else g_ref
            _close(g, g_ref, f"gradient of {label}", name, atol, rtol)
        if gradcheck:
            inputs = (x.detach()[:, :2].clone().requires_grad_(True), *(f.detach().clone().requires_grad_(True) for f in factors))
            if not torch.autograd.gradcheck(lambda xi, *fs: p.linear(xi, *fs), inputs, raise_exception=False, fast_mode=True):
                raise AssertionError(f"layer {name!r}: gradcheck of the factorised forward failed")

        if p.has_dense_form:
            original_type = torch.nn.utils.parametrize.type_before_parametrizations(layer64)
            merged = merge(copy.deepcopy(layer64))
            if type(merged) is not original_type:
                raise AssertionError(f"layer {name!r}: merge did not give a plain {original_type.__name__}")
            _close(merged.weight, weight.dense(), "merged weight", name, 0.0, 0.0)
            with torch.no_grad():
                expected = y if layer64.bias is None else y + layer64.bias
                _close(merged(x), expected, "merged forward", name, atol, rtol)


def _add_noise(factors, generator: torch.Generator) -> None:
    """Each factor plus noise of half its RMS (``1/√cols`` for an all-zero factor), in place."""
    with torch.no_grad():
        for f in factors:
            rms = f.pow(2).mean().sqrt().item() if f.numel() else 0.0
            scale = 0.5 * rms if rms > 0 else f.shape[-1] ** -0.5
            f.add_(torch.randn(f.shape, dtype=f.dtype, generator=generator), alpha=scale)


def _originals(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    plist = layer.parametrizations.weight
    if hasattr(plist, "original"):
        return (plist.original,)
    count = sum(1 for n, _ in plist.named_parameters(recurse=False) if n.startswith("original"))
    return tuple(getattr(plist, f"original{i}") for i in range(count))
