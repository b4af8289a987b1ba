"""recipes/bench/quality/init_scale.py: each method's layer output scale at init, against the methods' own
init formulas (for ``x ~ N(0, I)``, a linear map's output RMS is ``‖W‖_F / √out``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lsparam.methods.cola import cola_init_std
from recipes.bench.quality.init_scale import layer_gains, mean_gain

D, FFN, RANK = 256, 688, 64  # llama_20m: hidden 256, intermediate 688; every method's rank is d/4 there


def in_features(kind: str) -> int:
    return FFN if kind == "down_proj" else D


@pytest.mark.parametrize("knobs, std", [({}, 0.02), ({"init_range": 0.01}, 0.01), ({"linear_init_std": 0.005}, 0.005)])
def test_full_rank_layers_are_std_times_root_fan_in(knobs, std):
    gains = layer_gains("llama_20m", "full", **knobs)
    for kind, gain in gains.items():  # every entry N(0, std^2): ‖W‖_F^2 / out = std^2 · in
        assert gain == pytest.approx(std * math.sqrt(in_features(kind)), rel=0.03), kind


def test_sltrain_starts_as_its_sparse_part():
    # B = 0; density δ of the entries uniform in ±1/√in: ‖S‖_F^2 / out = δ · in · (1 / (3 in)) = δ / 3
    gains = layer_gains("llama_20m", "sltrain")
    for kind, gain in gains.items():
        assert gain == pytest.approx(math.sqrt(0.03 / 3), rel=0.03), kind


def test_cola_matches_its_factor_init_through_silu():
    # A x has entries N(0, in · s^2); y = B silu(A x): E[y_i^2] = r · s^2 · E[silu(z)^2], by quadrature over z
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    for kind, gain in layer_gains("llama_20m", "cola").items():
        out = FFN if kind in ("gate_proj", "up_proj") else D
        s = cola_init_std(RANK, out, in_features(kind))
        sigma = math.sqrt(in_features(kind)) * s
        density = torch.exp(-0.5 * (z / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        second_moment = torch.trapezoid(F.silu(z) ** 2 * density, z).item()
        assert gain == pytest.approx(math.sqrt(RANK * s**2 * second_moment), rel=0.04), kind


def test_galore_starts_as_full_rank_and_the_mean_weighs_kinds_equally():
    assert layer_gains("llama_20m", "galore") == layer_gains("llama_20m", "full")
    gains = {"a": 1.0, "b": 3.0}
    assert mean_gain(gains) == 2.0


def test_docstring_examples_run():
    import doctest

    from recipes.bench.quality import init_scale, plan, report

    for module in (init_scale, plan, report):
        assert doctest.testmod(module).failed == 0, module.__name__
