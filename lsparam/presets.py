"""LLaMA sizes and the papers' per-size settings, in one table.

The SLTrain, LOST, CoLA and GaLore papers train the same LLaMA shapes (vocabulary 32000, the T5 tokenizer);
``llama_9m`` and ``llama_20m`` are CPU-sized additions. The recipes, the memory ledger and the benchmarks
take their defaults from here.

>>> llama_config("llama_60m").hidden_size
512
>>> method_config("sltrain", "llama_60m")
SLTrainConfig(rank=128, density=0.03, alpha=32.0, seed=0, sparse_backend='auto', init='random')
"""

from __future__ import annotations

import dataclasses

from lsparam.config import CoLAConfig, LOSTConfig, LowRankConfig, SLTrainConfig
from lsparam.extras import require

# name: (hidden, intermediate, layers, heads)
LLAMA_SIZES = {
    "llama_9m": (128, 352, 4, 4),
    "llama_20m": (256, 688, 4, 4),
    "llama_60m": (512, 1376, 8, 8),
    "llama_130m": (768, 2048, 12, 12),
    "llama_350m": (1024, 2736, 24, 16),
    "llama_1b": (2048, 5461, 24, 32),
    "llama_7b": (4096, 11008, 32, 32),
}
VOCAB_SIZE = 32000

# The method names the recipes, the ledger and the benchmarks understand ("full": no parametrization).
METHODS = ("full", "lowrank", "sltrain", "lost", "lost-silu", "cola")
# Variants of a method that differ in how they run, not in what they compute: name -> (method, changes).
# CoLA-M (the CoLA paper's name) recomputes CoLA's rank-r activation in backward instead of saving it.
VARIANTS = {"cola-m": ("cola", {"checkpoint": True})}

# SLTrain's scripts per size: rank, density, alpha (GaLore's ranks are the same). Sizes not listed here
# (the CPU-sized ones) use rank hidden/4, density 0.03, alpha 32.
PAPER_SLTRAIN = {
    "llama_60m": dict(rank=128, density=0.03, alpha=32.0),
    "llama_130m": dict(rank=256, density=0.03, alpha=16.0),
    "llama_350m": dict(rank=256, density=0.03, alpha=16.0),
    "llama_1b": dict(rank=512, density=0.03, alpha=8.0),
    "llama_7b": dict(rank=1024, density=0.05, alpha=8.0),
}

# CoLA's per size: rank from its model configs; peak learning rate and warmup (a fraction of the steps)
# from its training scripts. Sizes not listed use rank hidden/4, DEFAULT_LR and TRAINING_DEFAULTS.
PAPER_COLA = {
    "llama_60m": {"rank": 128, "lr": 6e-3, "warmup": 0.2},
    "llama_130m": {"rank": 256, "lr": 3e-3, "warmup": 0.1},
    "llama_350m": {"rank": 256, "lr": 3e-3, "warmup": 0.1},
    "llama_1b": {"rank": 512, "lr": 2e-3, "warmup": 0.1},
    "llama_7b": {"rank": 1024, "lr": 1e-3, "warmup": 0.1},
}

# Peak learning rates: the papers' (full-rank AdamW 1e-3, SLTrain 3e-3, GaLore 1e-2, CoLA 6e-3 at 60M and
# below); LOST and low-rank as SLTrain (LOST's were not published). default_lr() has CoLA's per size.
DEFAULT_LR = {"full": 1e-3, "lowrank": 3e-3, "sltrain": 3e-3, "lost": 3e-3, "lost-silu": 3e-3, "cola": 6e-3,
              "galore": 1e-2}

# Training settings a method's scripts set beside the learning rate, named as recipes/pretrain.py's flags
# (--weight-decay, --clip-norm, --warmup, --min-lr-ratio). CoLA's scripts: AdamW weight decay 0.01, gradient
# clipping at norm 0.5, warmup 10% of the steps (20% at 60M: PAPER_COLA), cosine decay to 10% of the peak.
TRAINING_DEFAULTS = {"cola": {"weight_decay": 0.01, "clip_norm": 0.5, "warmup": 0.1, "min_lr_ratio": 0.1}}


def llama_config(name: str, **overrides):
    """A ``transformers.LlamaConfig`` for one of :data:`LLAMA_SIZES` (no download).

    >>> llama_config("llama_9m", num_hidden_layers=1).num_hidden_layers
    1
    """
    if name not in LLAMA_SIZES:
        raise ValueError(f"unknown model size {name!r}; valid: {sorted(LLAMA_SIZES)}")
    hidden, intermediate, layers, heads = LLAMA_SIZES[name]
    settings = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return require("transformers", "hf", "llama_config").LlamaConfig(**settings)


def size_of(config) -> str | None:
    """The :data:`LLAMA_SIZES` name whose shape a ``LlamaConfig`` has, else ``None``.

    >>> size_of(llama_config("llama_130m")), size_of(llama_config("llama_130m", num_hidden_layers=2))
    ('llama_130m', None)
    """
    shape = (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads)
    return next((name for name, dims in LLAMA_SIZES.items() if tuple(dims) == shape), None)


def method_config(method: str, size: str | None = None):
    """The config ``method`` stands for: the papers' per-size settings when ``size`` is a known LLaMA size.

    Low-rank and SLTrain take SLTrain's per-size rank; CoLA its own (:data:`PAPER_COLA`); LOST takes
    CoLA's default ``r = hidden / 4`` with 5% of the channels and γ = 0.5. Sizes without a paper setting
    take ``hidden / 4``; without a known size the rank is a quarter of each layer. ``"full"`` is ``None``.

    >>> method_config("lost-silu", "llama_60m").rank, method_config("lowrank").rank
    (128, 0.25)
    >>> method_config("cola", "llama_130m").rank, method_config("cola", "llama_20m").rank
    (256, 64)
    >>> method_config("full") is None
    True
    >>> method_config("cola-m", "llama_60m").checkpoint  # a variant (VARIANTS): CoLA recomputing its activation
    True
    """
    if method in VARIANTS:
        base, changes = VARIANTS[method]
        return dataclasses.replace(method_config(base, size), **changes)
    if method not in METHODS:
        raise ValueError(f"method must be one of {[*METHODS, *VARIANTS]}; got method={method!r}")
    if method == "full":
        return None
    quarter = LLAMA_SIZES[size][0] // 4 if size in LLAMA_SIZES else 0.25
    sltrain = PAPER_SLTRAIN.get(size, dict(rank=quarter, density=0.03, alpha=32.0))
    if method == "lowrank":
        return LowRankConfig(rank=sltrain["rank"])
    if method == "sltrain":
        return SLTrainConfig(**sltrain)
    if method == "cola":
        return CoLAConfig(rank=PAPER_COLA[size]["rank"] if size in PAPER_COLA else quarter)
    return LOSTConfig(rank=quarter, activation="silu" if method == "lost-silu" else None)


def default_lr(method: str, size: str | None = None) -> float:
    """The peak learning rate for ``method``: CoLA's per-size one where its scripts give it, else
    :data:`DEFAULT_LR`.

    >>> default_lr("cola", "llama_1b"), default_lr("cola", "llama_9m"), default_lr("sltrain", "llama_1b")
    (0.002, 0.006, 0.003)
    """
    if method not in DEFAULT_LR:
        raise ValueError(f"method must be one of {list(DEFAULT_LR)}; got method={method!r}")
    if method == "cola" and size in PAPER_COLA:
        return PAPER_COLA[size]["lr"]
    return DEFAULT_LR[method]


def training_defaults(method: str, size: str | None = None) -> dict:
    """The training settings ``method``'s scripts set beside the learning rate (``weight_decay``,
    ``clip_norm``, ``warmup``, ``min_lr_ratio``: recipes/pretrain.py's flags), ``{}`` for a method without.

    >>> training_defaults("cola", "llama_60m")
    {'weight_decay': 0.01, 'clip_norm': 0.5, 'warmup': 0.2, 'min_lr_ratio': 0.1}
    >>> training_defaults("sltrain")
    {}
    """
    if method not in DEFAULT_LR:
        raise ValueError(f"method must be one of {list(DEFAULT_LR)}; got method={method!r}")
    settings = dict(TRAINING_DEFAULTS.get(method, {}))
    if method == "cola" and size in PAPER_COLA:
        settings["warmup"] = PAPER_COLA[size]["warmup"]
    return settings
