"""``init="dense"``: every method starts from the closest weight of its structure to the layer's current one.

The references are independent float64 numpy math: the Eckart–Young bound from numpy's SVD, the residual's
column norms and largest entries computed here, and the relative Frobenius error written out.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lsparam
from lsparam.testing import linear_layers

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Small layers at high rank save nothing: the warning is tested in test_targets.py, not here.
pytestmark = pytest.mark.filterwarnings("ignore::lsparam.NoSavingWarning")


def dense_configs(rank):
    """One dense-init config of each linear method, at ``rank``."""
    return st.one_of(
        st.builds(lsparam.LowRankConfig, rank=st.just(rank), init=st.just("dense")),
        st.builds(lsparam.SLTrainConfig, rank=st.just(rank), density=st.floats(0.1, 0.5), alpha=st.floats(1.0, 64.0),
                  init=st.just("dense")),
        st.builds(lsparam.LOSTConfig, rank=st.just(rank), channel_ratio=st.floats(0.01, 1.0),
                  gamma=st.floats(0.05, 1.0), init=st.just("dense")),
    )


def parametrized(layer, config):
    return lsparam.parametrize(layer, config, target_modules=None)


def eckart_young(w: np.ndarray, r: int) -> float:
    """The smallest relative Frobenius error of any rank-r matrix: ``sqrt(Σ_{i≥r} σ_i²) / ‖W‖``."""
    sigma = np.linalg.svd(w, compute_uv=False)
    return float(np.sqrt((sigma[r:] ** 2).sum()) / np.sqrt((sigma**2).sum()))


def relative_error(layer, w0: np.ndarray) -> float:
    start = layer.weight.dense().detach().numpy()
    return float(np.linalg.norm(start - w0) / np.linalg.norm(w0))


@PROPERTY
@given(layer=linear_layers(max_features=12), data=st.data())
def test_at_full_rank_the_dense_init_reproduces_the_weight(layer, data):
    w0 = layer.weight.detach().numpy().copy()
    full = min(layer.in_features, layer.out_features)
    parametrized(layer, data.draw(dense_configs(full)))
    np.testing.assert_allclose(layer.weight.dense().detach().numpy(), w0, rtol=0, atol=1e-10)


@PROPERTY
@given(layer=linear_layers(min_features=6, max_features=16), rank=st.integers(1, 5), data=st.data())
def test_below_full_rank_the_error_is_the_eckart_young_bound_or_less(layer, rank, data):
    w0 = layer.weight.detach().numpy().copy()
    config = data.draw(dense_configs(rank))
    parametrized(layer, config)
    bound = eckart_young(w0, rank)
    error = relative_error(layer, w0)
    if isinstance(config, lsparam.LowRankConfig):
        assert error == pytest.approx(bound, rel=1e-9, abs=1e-12)
    else:  # a sparse part on top of the truncated SVD only removes error
        assert error <= bound + 1e-12
    # parametrize measured the same figure, and summary prints it
    p = layer.parametrizations.weight[0]
    assert p.init_error == pytest.approx(error, rel=1e-9, abs=1e-12)


@PROPERTY
@given(layer=linear_layers(min_features=6, max_features=16), rank=st.integers(1, 4),
       channel_ratio=st.floats(0.05, 1.0), gamma=st.floats(0.05, 0.95))
def test_lost_dense_init_scales_the_svd_by_gamma_and_the_residual_by_one_minus_gamma(layer, rank, channel_ratio, gamma):
    w0 = layer.weight.detach().numpy().copy()
    parametrized(layer, lsparam.LOSTConfig(rank=rank, channel_ratio=channel_ratio, gamma=gamma, init="dense"))
    plist = layer.parametrizations.weight
    B, A, sparse = (getattr(plist, f"original{i}").detach().numpy() for i in range(3))
    U, sigma, Vh = np.linalg.svd(w0, full_matrices=False)
    truncated = (U[:, :rank] * sigma[:rank]) @ Vh[:rank]
    np.testing.assert_allclose(gamma * B @ A, truncated, atol=1e-10)
    residual = w0 - truncated
    scores = np.linalg.norm(residual, axis=0)
    kept = plist[0].channels.tolist()
    assert kept == sorted(kept) and len(kept) == max(1, math.floor(channel_ratio * layer.in_features))
    dropped = np.setdiff1d(np.arange(layer.in_features), kept)
    if len(dropped):
        assert scores[kept].min() >= scores[dropped].max() - 1e-12
    np.testing.assert_allclose((1 - gamma) * sparse, residual[:, kept], atol=1e-10)
    # so the start is the truncated SVD plus the residual on the kept channels, zero elsewhere
    expected = truncated.copy()
    expected[:, kept] += residual[:, kept]
    np.testing.assert_allclose(layer.weight.dense().detach().numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_lost_dense_init_at_the_ends_of_gamma(gamma):
    """γ = 0: the channels carry W itself; γ = 1: W is the truncated SVD (the sparse path is off)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 12, dtype=torch.float64)
    w0 = layer.weight.detach().numpy().copy()
    parametrized(layer, lsparam.LOSTConfig(rank=3, channel_ratio=0.25, gamma=gamma, init="dense"))
    start = layer.weight.dense().detach().numpy()
    kept = layer.parametrizations.weight[0].channels.tolist()
    if gamma == 0.0:
        top = np.sort(np.argsort(-np.linalg.norm(w0, axis=0))[:4]).tolist()
        assert kept == top
        expected = np.zeros_like(w0)
        expected[:, kept] = w0[:, kept]
    else:
        U, sigma, Vh = np.linalg.svd(w0, full_matrices=False)
        expected = (U[:, :3] * sigma[:3]) @ Vh[:3]
    np.testing.assert_allclose(start, expected, atol=1e-10)


def test_the_paper_inits_do_not_reproduce_a_trained_weight_and_dense_does():
    """The failure users meet: LOST's paper init starts at γ·SVD_r + (1 − γ)·W[:, I], far from W."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 32, dtype=torch.float64)
    w0 = layer.weight.detach().numpy().copy()
    errors = {}
    for label, config in {
        "paper": lsparam.LOSTConfig(rank=16),
        "dense": lsparam.LOSTConfig(rank=16, init="dense"),
        "lowrank": lsparam.LowRankConfig(rank=16),
    }.items():
        copy = torch.nn.Linear(48, 32, dtype=torch.float64)
        copy.load_state_dict(layer.state_dict())
        parametrized(copy, config)
        errors[label] = relative_error(copy, w0)
    assert errors["dense"] <= errors["lowrank"] == pytest.approx(eckart_young(w0, 16))
    assert errors["paper"] > errors["lowrank"]  # worse than plain truncation, as users found


def test_summary_shows_the_init_error_and_forgets_it_after_a_load():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    w0 = model[0].weight.detach().double().numpy().copy()
    lsparam.parametrize(model, lsparam.LOSTConfig(rank=8, activation="silu"), target_modules=["2"])
    lsparam.parametrize(model, lsparam.LowRankConfig(rank=8), target_modules=["0"])
    rows = {line.split()[0]: line.split() for line in lsparam.summary(model).splitlines()[1:-2]}
    assert rows["0"][-1] == f"{100 * eckart_young(w0, 8):.1f}%"
    assert rows["2"][-1] == "-"  # SiLU has no dense form: no error to show
    model.load_state_dict(model.state_dict())
    rows = {line.split()[0]: line.split() for line in lsparam.summary(model).splitlines()[1:-2]}
    assert rows["0"][-1] == "-"


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: lsparam.LOSTConfig(activation="silu", init="dense"), r"init='dense'.*activation='silu' has no dense form"),
        (lambda: lsparam.LOSTConfig(init="dense", residual_window=4), r"residual_window=4"),
        (lambda: lsparam.LOSTConfig(init="dense", sparse_init="residual"), r"sparse_init='residual'"),
        (lambda: lsparam.LOSTConfig(init="random"), r"init must be one of \['paper', 'dense'\]; got init='random'"),
        (lambda: lsparam.LowRankConfig(init="random"), r"init must be one of \['dense'\]; got init='random'"),
        (lambda: lsparam.SLTrainConfig(init="paper"), r"init must be one of \['random', 'dense'\]; got init='paper'"),
    ],
    ids=["lost-silu", "lost-window", "lost-sparse-init", "lost-random", "lowrank-random", "sltrain-paper"],
)
def test_dense_init_where_it_cannot_apply_is_refused_clearly(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_a_checkpoint_saved_before_the_init_field_loads_when_the_model_uses_the_default():
    """State_dicts written before ``init`` existed carry specs without it: same settings load, others are refused."""
    import json

    from lsparam.methods.base import decode_spec, encode_spec

    def old_state_dict(config):
        torch.manual_seed(0)
        model = lsparam.parametrize(torch.nn.Sequential(torch.nn.Linear(16, 16)), config)
        state = model.state_dict()
        spec = json.loads(decode_spec(state["0.parametrizations.weight.0.lsparam_spec"]))
        del spec["config"]["init"]
        state["0.parametrizations.weight.0.lsparam_spec"] = encode_spec(spec)
        return model, state

    for config in (lsparam.LowRankConfig(rank=4), lsparam.LOSTConfig(rank=4)):
        source, state = old_state_dict(config)
        torch.manual_seed(1)
        target = lsparam.parametrize(torch.nn.Sequential(torch.nn.Linear(16, 16)), config)
        target.load_state_dict(state)
        x = torch.randn(3, 16)
        assert torch.equal(target(x), source(x))
    _, state = old_state_dict(lsparam.LOSTConfig(rank=4))
    other = lsparam.parametrize(torch.nn.Sequential(torch.nn.Linear(16, 16)), lsparam.LOSTConfig(rank=4, init="dense"))
    with pytest.raises(ValueError, match=r"config\.init: state_dict has None, model has 'dense'"):
        other.load_state_dict(state)


def test_no_warning_for_a_dense_init_that_saves_parameters():
    layer = torch.nn.Linear(64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parametrized(layer, lsparam.LOSTConfig(rank=16, init="dense"))


def test_a_gamma_too_small_for_the_dense_init_is_refused_with_the_model_untouched():
    """γ·B A = SVD_r needs B A = SVD_r / γ: a subnormal γ (found by hypothesis) overflows to inf."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, dtype=torch.float64))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"gamma=2\.2e-311 is too small for init='dense' on layer '0'"):
        lsparam.parametrize(model, lsparam.LOSTConfig(rank=2, gamma=2.2e-311, init="dense"))
    assert lsparam.structured_layers(model) == {} and torch.equal(model[0].weight, before)
