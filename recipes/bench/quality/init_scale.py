"""How large each method's decoder layers start: the output scale of every linear layer at initialisation.

One candidate explanation of the study's short-budget ranking is the scale the weights start at: a plain
``LlamaForCausalLM`` draws every weight with std 0.02 (``initializer_range``), while SLTrain starts from a
3%-dense ``S`` (``B = 0``), LOST from a scaled, truncated ``W0`` and CoLA from its own ``r^(-1/4) (in +
out)^(-1/4)`` factors. This measures, for the study's model, the root-mean-square output of each of the
decoder's linear layers (q, k, v, o, gate, up, down) for standard-normal inputs, the scale of the RMS-normed
hidden states they see: for a linear map ``W`` that is ``‖W‖_F / √out``. Built from configs alone (no data,
no training), so the report can show it next to the results.

    >>> gains = layer_gains("llama_20m", "full")
    >>> round(gains["q_proj"], 2)  # 0.02 · √256 for a 256-wide layer of std 0.02
    0.32
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UNPARAMETRIZED = ("full", "galore")  # GaLore projects the gradients, not the weights: its model is full-rank's


@functools.lru_cache(maxsize=None)  # the report asks again for the same rows; each build takes a second or two
def layer_gains(model: str, method: str, init_range: float | None = None, linear_init_std: float | None = None,
                tokens: int = 4096, seed: int = 0) -> dict[str, float]:
    """Each decoder layer kind's output RMS for ``N(0, 1)`` inputs at init, averaged over the blocks.

    ``model`` is a name in ``recipes/configs`` or a config JSON (as ``--model``); ``method`` one of the
    study's; ``init_range`` overrides the config's ``initializer_range`` and ``linear_init_std`` re-draws
    the decoder's linear weights (``--linear-init-std``), full-rank's init knobs. The model is built as
    ``recipes/pretrain.py`` builds it (seed 0, the method's per-size config).
    """
    import torch
    from transformers import LlamaConfig

    from lsparam.presets import method_config, size_of
    from recipes.flags import find_config
    from recipes.pretrain import build_model

    config = LlamaConfig(**{**json.loads(find_config(model).read_text()), "vocab_size": 256})  # the vocabulary plays no part
    if init_range is not None:
        config.initializer_range = init_range
    recipe = argparse.Namespace(seed=seed, method=method, linear_init_std=linear_init_std, lean_head=False, precision="fp32")
    settings = None if method in UNPARAMETRIZED else method_config(method, size_of(config))
    net = build_model(recipe, config, settings, "cpu")
    generator = torch.Generator().manual_seed(seed)
    gains: dict[str, list[float]] = {}
    with torch.no_grad():
        for block in net.model.layers:
            for name, layer in block.named_modules():
                kind = name.rsplit(".", 1)[-1]
                if kind in LAYERS:
                    x = torch.randn(tokens, layer.in_features, generator=generator)
                    gains.setdefault(kind, []).append(layer(x).pow(2).mean().sqrt().item())
    return {kind: statistics.fmean(gains[kind]) for kind in LAYERS}


def mean_gain(gains: dict[str, float]) -> float:
    """The layer kinds' gains averaged (each kind once, whatever its count)."""
    return statistics.fmean(gains.values())
