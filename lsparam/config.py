"""One dataclass per method: *what* a linear layer becomes.

Every field is validated in ``__post_init__`` so a bad value fails when the config is built, before any
model is touched. Per-layer checks (a rank too large for one layer's shape) happen in
:func:`lsparam.parametrize`, again before anything is registered.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

SPARSE_BACKENDS = ("auto", "gather", "csr", "scatter", "semi-structured")
LOST_ACTIVATIONS = (None, "silu")
LOST_SPARSE_INITS = ("original", "residual")
# ``init``: each method's from-scratch init (the paper's) is the default; "dense" starts every layer from the
# best approximation of its current weight within the method's structure (continued pretraining).
DENSE_INIT = "dense"
LOWRANK_INITS = (DENSE_INIT,)
SLTRAIN_INITS = ("random", DENSE_INIT)
LOST_INITS = ("paper", DENSE_INIT)
# CoLA's activation between the factors: the paper's SiLU, or another of the official code's choices.
COLA_ACTIVATIONS = ("silu", "gelu", "relu")
COLA_INITS = ("random",)


def _check_rank(rank) -> None:
    """A rank is a positive int, or a float in (0, 1) meaning that fraction of ``min(in, out)``."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise TypeError(
            f"rank must be an int (absolute rank) or a float in (0, 1) (fraction of min(in, out)); "
            f"got {rank!r} of type {type(rank).__name__}"
        )
    if isinstance(rank, numbers.Integral):
        if rank <= 0:
            raise ValueError(f"rank must be a positive int or a float in (0, 1); got rank={rank}")
        return
    if not math.isfinite(rank) or not 0.0 < rank < 1.0:
        raise ValueError(
            f"a float rank is a fraction of min(in, out) and must lie in (0, 1); got rank={rank}. "
            f"Pass an int for an absolute rank."
        )


def _check_fraction(name: str, value, *, low_open: bool = True) -> None:
    """``value`` must be a real number in (0, 1] (or [0, 1] when ``low_open`` is False)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {value!r} of type {type(value).__name__}")
    low_ok = value > 0.0 if low_open else value >= 0.0
    if not (math.isfinite(value) and low_ok and value <= 1.0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}; got {name}={value}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {name}={value!r}")


def resolve_rank(rank, out_features: int, in_features: int, *, layer: str = "") -> int:
    """The integer rank of one layer, from a config's ``rank``.

    A float is a fraction of ``min(in, out)``, rounded down. The result must lie in ``[1, min(in, out)]``:
    beyond ``min(in, out)`` the weight has no more singular directions to hold. A factorisation saves
    parameters only while ``r·(in + out) < in·out``, i.e. ``r < in·out / (in + out)`` (half of ``min`` for a
    square layer); :func:`lsparam.parametrize` warns about layers that save nothing, it does not refuse them.

    >>> resolve_rank(0.25, 512, 1376)
    128
    >>> resolve_rank(64, 512, 1376)
    64
    """
    _check_rank(rank)
    smaller = min(out_features, in_features)
    where = f" for layer {layer!r}" if layer else ""
    r = int(rank) if isinstance(rank, numbers.Integral) else int(math.floor(rank * smaller))
    if r < 1:
        raise ValueError(
            f"rank={rank} gives r={r}{where} of shape {out_features}x{in_features}; "
            f"use a larger fraction or an int rank >= 1"
        )
    if r > smaller:
        raise ValueError(
            f"rank={rank} gives r={r}{where} of shape {out_features}x{in_features}, "
            f"but r must be <= min(in, out) = {smaller}"
        )
    return r


class _ConfigBase:
    """Shared helpers: the config as JSON-able data, stored with each layer to refuse loading another config."""

    method: str = ""

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    def _plain_numbers(self) -> None:
        """NumPy (and other) numeric scalars as Python ints and floats: the config is stored as JSON with
        each layer, and compared by value."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            setattr(self, f.name, int(value) if isinstance(value, numbers.Integral) else float(value))


@dataclass
class LowRankConfig(_ConfigBase):
    """Pure low-rank weights ``W = B A``, the baseline both papers beat.

    ``B`` and ``A`` start from the top-``r`` SVD of the layer's current weight (``√Σ`` on each side),
    the best rank-``r`` approximation of it (Eckart–Young). That is ``init="dense"``, the only init: on a
    random model it is the SVD of the random init, on a trained one the closest rank-``r`` weight.

    >>> LowRankConfig(rank=0.25)
    LowRankConfig(rank=0.25, init='dense')
    """

    method = "lowrank"
    rank: int | float = field(
        default=0.25, metadata={"help": "int rank, or a float in (0, 1): fraction of min(in, out)"}
    )
    init: str = field(
        default=DENSE_INIT, metadata={"help": "'dense': the top-r SVD of the current weight (the only init)"}
    )

    def __post_init__(self):
        self._plain_numbers()
        _check_rank(self.rank)
        _check_choice("init", self.init, LOWRANK_INITS)


@dataclass
class SLTrainConfig(_ConfigBase):
    """SLTrain: ``W = (alpha / r) · B A + S`` with a fixed random sparse support (Han et al., 2024).

    ``S`` has ``floor(density · out · in)`` entries on a support drawn from ``(seed, layer name, shape)``,
    so it is regenerated rather than stored.

    >>> SLTrainConfig(rank=128, density=0.03, alpha=32.0).density
    0.03
    """

    method = "sltrain"
    rank: int | float = field(
        default=0.25, metadata={"help": "int rank, or a float in (0, 1): fraction of min(in, out)"}
    )
    density: float = field(
        default=0.03, metadata={"help": "fraction of out*in entries in the sparse part, in (0, 1]"}
    )
    alpha: float = field(default=32.0, metadata={"help": "low-rank scale: the product is scaled by alpha / r"})
    seed: int = field(default=0, metadata={"help": "seed of the sparse support (with layer name and shape)"})
    sparse_backend: str = field(
        default="auto",
        metadata={"help": f"sparse matmul path, one of {list(SPARSE_BACKENDS)}"},
    )
    init: str = field(
        default="random",
        metadata={
            "help": "'random' (paper: B = 0, A and values uniform) or 'dense' (top-r SVD of the current "
            "weight plus its largest-magnitude residual entries as support, for continued pretraining)"
        },
    )

    def __post_init__(self):
        self._plain_numbers()
        _check_rank(self.rank)
        _check_fraction("density", self.density)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):
            raise TypeError(f"alpha must be a number; got {self.alpha!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive finite number; got alpha={self.alpha}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int; got seed={self.seed!r}")
        _check_choice("sparse_backend", self.sparse_backend, SPARSE_BACKENDS)
        _check_choice("init", self.init, SLTRAIN_INITS)
        if self.sparse_backend == "semi-structured" and self.density != 0.5:
            raise ValueError(
                f"sparse_backend='semi-structured' keeps 2 of every 4 weights, so density must be 0.5; "
                f"got density={self.density}"
            )
        if self.sparse_backend == "semi-structured" and self.init == DENSE_INIT:
            raise ValueError("init='dense' picks an unstructured support; use it with sparse_backend 'auto', 'gather', 'csr' or 'scatter'")


@dataclass
class LOSTConfig(_ConfigBase):
    """LOST: SVD-initialised low-rank plus channel-wise sparse weights (Li et al., 2025).

    ``y = γ · φ(x Aᵀ) Bᵀ + (1 − γ) · x[..., I] W_sᵀ`` with ``I`` the input channels whose residual
    (the spectrum below rank ``r``) has the largest L2 norm.

    ``init="paper"`` (default) is the paper's from-scratch init: ``B A`` the top-``r`` SVD with ``√Σ`` on
    each side and ``W_s = W[:, I]``, so the layer starts as ``γ·SVD_r(W) + (1 − γ)·W[:, I]``, not as ``W``.
    ``init="dense"`` starts from the closest weight of that structure (continued pretraining):
    ``γ·B A = SVD_r(W)`` and ``W_s`` the residual on the kept channels divided by ``1 − γ``; it needs the
    linear variant (SiLU has no dense form).

    >>> LOSTConfig(rank=0.25, channel_ratio=0.05, gamma=0.5).activation is None
    True
    >>> LOSTConfig(init="dense").init
    'dense'
    """

    method = "lost"
    rank: int | float = field(
        default=0.25, metadata={"help": "int rank, or a float in (0, 1): fraction of min(in, out)"}
    )
    channel_ratio: float = field(
        default=0.05, metadata={"help": "fraction of input channels kept dense in the sparse part, in (0, 1]"}
    )
    gamma: float = field(default=0.5, metadata={"help": "weight of the low-rank path, in [0, 1]"})
    activation: str | None = field(
        default=None, metadata={"help": "None (linear LOST, mergeable) or 'silu' (the paper's variant)"}
    )
    residual_window: int | None = field(
        default=None,
        metadata={"help": "None: score channels on the whole spectrum below r; k: on components r..r+k-1"},
    )
    sparse_init: str = field(
        default="original",
        metadata={"help": "init='paper' only: 'original': W_s = W0[:, I]; 'residual': W_s = W_c[:, I]"},
    )
    init: str = field(
        default="paper",
        metadata={
            "help": "'paper' (SVD of the current weight, W_s = W[:, I]; for a random model) or 'dense' (the "
            "closest LOST weight to the current one, for continued pretraining; linear LOST only)"
        },
    )

    def __post_init__(self):
        self._plain_numbers()
        _check_rank(self.rank)
        _check_fraction("channel_ratio", self.channel_ratio)
        _check_fraction("gamma", self.gamma, low_open=False)
        _check_choice("activation", self.activation, LOST_ACTIVATIONS)
        _check_choice("sparse_init", self.sparse_init, LOST_SPARSE_INITS)
        if self.residual_window is not None and (
            isinstance(self.residual_window, bool)
            or not isinstance(self.residual_window, numbers.Integral)
            or self.residual_window <= 0
        ):
            raise ValueError(
                f"residual_window must be None or a positive int; got residual_window={self.residual_window!r}"
            )
        _check_choice("init", self.init, LOST_INITS)
        if self.init == DENSE_INIT:
            if self.activation is not None:
                raise ValueError(
                    f"init='dense' starts from the closest LOST weight to the layer's current one, but "
                    f"activation={self.activation!r} has no dense form (a nonlinearity sits between the factors), "
                    f"so no weight is closest. Use LOSTConfig(init='dense') (linear LOST) for continued "
                    f"pretraining, or init='paper' with activation={self.activation!r}."
                )
            # the dense init picks channels on the whole residual and sets W_s from it: these would be ignored
            if self.residual_window is not None or self.sparse_init != "original":
                raise ValueError(
                    f"residual_window and sparse_init belong to init='paper'; init='dense' scores channels on the "
                    f"whole residual and starts W_s from it. Got residual_window={self.residual_window!r}, "
                    f"sparse_init={self.sparse_init!r}."
                )


@dataclass
class CoLAConfig(_ConfigBase):
    """CoLA: every linear layer becomes ``y = B σ(A x)``, a rank-``r`` bottleneck with a nonlinearity
    between the factors (Liu et al., 2025).

    ``A`` (r×in) and ``B`` (out×r) start with independent normal entries of standard deviation
    ``r^(-1/4) · (in + out)^(-1/4)`` (the paper's init; ``B A`` then has entries of standard deviation
    ``1/√(in + out)``), drawn from a generator seeded from ``(seed, layer name, shape)``: the layer's dense
    weight is not used. With σ between the factors the layer has no dense form, so ``merge`` and dense
    export refuse it. ``checkpoint=True`` saves only the layer's input for backward and recomputes
    ``A x`` there (one extra ``r×in`` product per layer) instead of keeping ``r`` values per token.

    >>> CoLAConfig(rank=128)
    CoLAConfig(rank=128, activation='silu', checkpoint=False, seed=0, init='random')
    >>> CoLAConfig(activation="tanh")
    Traceback (most recent call last):
        ...
    ValueError: activation must be one of ['silu', 'gelu', 'relu']; got activation='tanh'
    """

    method = "cola"
    rank: int | float = field(
        default=0.25, metadata={"help": "int rank, or a float in (0, 1): fraction of min(in, out)"}
    )
    activation: str = field(
        default="silu",
        metadata={"help": f"the nonlinearity between the factors, one of {list(COLA_ACTIVATIONS)} (the paper: silu)"},
    )
    checkpoint: bool = field(
        default=False,
        metadata={"help": "True: save only the layer's input for backward and recompute A x there (less memory, "
                          "one more r x in product per layer)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the random init (with layer name and shape)"})
    init: str = field(
        default="random",
        metadata={"help": "'random' (the paper's: normal factors, the dense weight unused; the only init)"},
    )

    def __post_init__(self):
        self._plain_numbers()
        _check_rank(self.rank)
        _check_choice("activation", self.activation, COLA_ACTIVATIONS)
        if not isinstance(self.checkpoint, bool):
            raise TypeError(
                f"checkpoint must be True or False; got checkpoint={self.checkpoint!r} of type "
                f"{type(self.checkpoint).__name__}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int; got seed={self.seed!r}")
        if self.init == DENSE_INIT:
            raise ValueError(
                "init='dense' starts from the closest weight of a method's structure to the layer's current one, but "
                "CoLA has no dense form (a nonlinearity sits between the factors), so no CoLA weight is closest. "
                "CoLA starts from its random init (init='random'); for continued pretraining use a linear method "
                "(LowRankConfig, SLTrainConfig(init='dense') or LOSTConfig(init='dense'))."
            )
        _check_choice("init", self.init, COLA_INITS)


def default_config() -> LOSTConfig:
    """The config ``parametrize(model)`` uses when given none: LOST with SiLU, the winner of the quality
    study (docs/methods.md#defaults), at the studied sizes (rank 1/4, 5% of channels, γ = 0.5).

    >>> default_config()
    LOSTConfig(rank=0.25, channel_ratio=0.05, gamma=0.5, activation='silu', residual_window=None, sparse_init='original', init='paper')
    """
    return LOSTConfig(activation="silu")
