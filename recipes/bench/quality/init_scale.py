"""How large each method's decoder layers start, and the quality report's section on what that explains.

One candidate explanation of the study's short-budget ranking is the scale the weights start at: a plain
``LlamaForCausalLM`` draws every weight with std 0.02 (``initializer_range``), while SLTrain starts from a
3%-dense ``S`` (``B = 0``), LOST from a scaled, truncated ``W0`` and CoLA from its own ``r^(-1/4) (in +
out)^(-1/4)`` factors. This measures, for the study's model, the root-mean-square output of each of the
decoder's linear layers (q, k, v, o, gate, up, down) for standard-normal inputs, the scale of the RMS-normed
hidden states they see: for a linear map ``W`` that is ``‖W‖_F / √out``. Built from configs alone (no data,
no training), so the report (:func:`why_section`) shows it next to the results, with the direct test: full-rank
from another init (``--linear-init-std``) against the same configuration from its own.

    >>> gains = layer_gains("llama_20m", "full")
    >>> round(gains["q_proj"], 2)  # 0.02 · √256 for a 256-wide layer of std 0.02
    0.32
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics

from recipes.bench.quality.plan import FULL_ONE_LR, Result

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
    from recipes.pretrain import build_model, decoder_linears

    config = LlamaConfig(**{**json.loads(find_config(model).read_text()), "vocab_size": 256})  # the vocabulary plays no part
    if init_range is not None:
        config.initializer_range = init_range
    recipe = argparse.Namespace(seed=seed, method=method, linear_init_std=linear_init_std, lean_head=False, precision="fp32")
    settings = None if method in UNPARAMETRIZED else method_config(method, size_of(config))
    net = build_model(recipe, config, settings, "cpu")
    names = {id(module): name for name, module in net.named_modules()}
    generator = torch.Generator().manual_seed(seed)
    gains: dict[str, list[float]] = {}  # kind (q_proj, ..., down_proj) -> one gain per block
    with torch.no_grad():
        for layer in decoder_linears(net):
            x = torch.randn(tokens, layer.in_features, generator=generator)
            gains.setdefault(names[id(layer)].rsplit(".", 1)[-1], []).append(layer(x).pow(2).mean().sqrt().item())
    return {kind: statistics.fmean(values) for kind, values in gains.items()}


def mean_gain(gains: dict[str, float]) -> float:
    """The layer kinds' gains averaged (each kind once, whatever its count)."""
    return statistics.fmean(gains.values())


def rank_correlation(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among measured values).

    >>> rank_correlation([1, 2, 3, 4], [10, 30, 20, 40])
    0.8
    """
    def ranks(values):
        return [sorted(values).index(v) for v in values]
    return statistics.correlation(ranks(xs), ranks(ys))


def _rows(results: list[Result], table: dict, short: int) -> list[tuple]:
    """(row, run, ppl, record): each method's best configuration at the short budget, then full-rank's best
    run from each other init."""
    rows = [(row, data["run"], data["ppl"], data["runs"][0].record) for row, data in table.items()
            if row != FULL_ONE_LR and data["runs"][0].finished]
    inits: dict[tuple, Result] = {}
    for r in results:
        if (r.run.method, r.run.seed, r.run.tokens) == ("full", 0, short) and r.run.init_changed and r.finished:
            init = (r.run.init_range, r.run.linear_init_std)
            if init not in inits or r.ppl < inits[init].ppl:
                inits[init] = r
    shown = {run.config() for _, run, _, _ in rows}
    for r in sorted(inits.values(), key=lambda r: r.run.name):
        if r.run.config() not in shown:
            init = f"init {r.run.init_range:g}" if r.run.init_range is not None else f"linear init std {r.run.linear_init_std:g}"
            rows.append((f"full, {init}", r.run, r.ppl, r.record))
    return rows


def _direct_test(results: list[Result], rows: list[tuple], gains: dict, short: int) -> str | None:
    """Full-rank from another init against the same configuration from its own: does the init move it?"""
    default_init = {r.run.config(): r for r in results if r.finished and r.run.seed == 0 and r.run.tokens == short}
    pairs = []
    for row, run, ppl, _ in rows:
        reference = default_init.get(run.at(init_range=None, linear_init_std=None).config())
        if run.method == "full" and run.init_changed and math.isfinite(ppl) and reference is not None:
            pairs.append((run, ppl, gains[row], reference.ppl))
    if not pairs:
        return None
    tried = "; ".join(f"{run.label()} (init gain {gain:.3f}): {ppl:.1f} against {ref:.1f} ({ppl / ref - 1:+.1%})"
                      for run, ppl, gain, ref in pairs)
    best = min(ppl / ref - 1 for _, ppl, _, ref in pairs)
    verdict = ("none is 2% better: init scale alone does not explain the ranking" if best > -0.02 else
               f"the best is {best:+.1%}: the init scale moves full-rank")
    return f"Full-rank from another init, against the same configuration from its own: {tried}; {verdict}."


def why_section(results: list[Result], model: str, table: dict, short: int, budget: str) -> list[str]:
    """The report's section on init scale: each method's init gain next to its perplexity at the short budget
    (``table``: the report's best configuration per row there) with full-rank's runs from other inits, the
    rank correlation over the methods, and the direct test."""
    rows = _rows(results, table, short)
    if len(rows) < 2:
        return []
    gains = {row: mean_gain(layer_gains(model, run.method, run.init_range, run.linear_init_std)) for row, run, _, _ in rows}
    rows.sort(key=lambda row: gains[row[0]])
    lines = [f"### Why: the scale each method starts at ({budget} tokens)", "",
             "*Init gain*: the root-mean-square output of the decoder's linear layers (q, k, v, o, gate, up, down; "
             "each kind averaged over the blocks, then the kinds averaged) for standard-normal inputs, the scale of "
             "the normalised hidden states they see, in the model each run starts from "
             "(`recipes/bench/quality/init_scale.py`). Full-rank's layers are drawn with std 0.02 (`initializer_range`); "
             "SLTrain starts from its 3%-dense sparse part (B = 0), LOST from a scaled, truncated copy of that weight, "
             "CoLA from its own factors. GaLore's model is full-rank's: it differs in its updates.", "",
             "| method | configuration | init gain | initial valid loss | valid ppl |", "|---|---|---|---|---|"]
    for row, run, ppl, record in rows:
        initial = record.get("initial_val_loss")
        lines.append(f"| {row} | {run.label()} | {gains[row]:.3f} | {f'{initial:.3f}' if initial is not None else '-'} | {ppl:.1f} |")
    methods = [e for e in rows if math.isfinite(e[2]) and e[1].method != "galore" and not e[1].init_changed]
    if len(methods) >= 3:
        rho = rank_correlation([gains[e[0]] for e in methods], [e[2] for e in methods])
        lines += ["", f"Rank correlation of init gain with perplexity over the methods at their own init (GaLore aside): "
                      f"{rho:+.2f} ({len(methods)} methods; +1: the smaller a method starts, the lower its perplexity, "
                      f"in every case). A correlation is not a cause: full-rank started at other scales tests it."]
    direct = _direct_test(results, rows, gains, short)
    if direct:
        lines += ["", direct]
    lines.append("")
    return lines
