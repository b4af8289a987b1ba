"""Property tests of each decomposition against independent dense float64 math."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lsparam
from lsparam.testing import assert_decomposition, configs, linear_layers

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Drawn layers are tiny: many configs save nothing on them, by design (the warning: test_targets.py).
pytestmark = pytest.mark.filterwarnings("ignore::lsparam.NoSavingWarning")


def parametrized(layer, config):
    return lsparam.parametrize(layer, config, target_modules=None)


def factors_of(layer):
    plist = layer.parametrizations.weight
    return [getattr(plist, f"original{i}") for i in range(len(plist[0].factor_names))]


def numpy_svd(weight):
    return np.linalg.svd(weight.detach().double().numpy(), full_matrices=False)


@PROPERTY
@given(layer=linear_layers(), config=configs())
def test_every_decomposition_matches_its_formula_gradients_and_merge(layer, config):
    assert_decomposition(parametrized(layer, config))


@PROPERTY
@given(layer=linear_layers(max_features=16), config=configs(("lost",)))
def test_lost_low_rank_part_is_eckart_young_optimal(layer, config):
    w0 = layer.weight.detach().clone()
    parametrized(layer, config)
    B, A, _ = factors_of(layer)
    r = B.shape[1]
    _, sigma, _ = numpy_svd(w0)
    # init="dense" scales the low-rank path so that γ·B A (not B A) is the truncated SVD
    scale = config.gamma if config.init == "dense" and config.gamma > 0 else 1.0
    error = torch.linalg.matrix_norm(w0 - scale * B @ A).item() ** 2
    assert error == pytest.approx(float((sigma[r:] ** 2).sum()), rel=1e-9, abs=1e-12)


@PROPERTY
@given(layer=linear_layers(max_features=16), config=configs(("lost",)))
def test_lost_keeps_the_top_residual_channels_and_starts_from_them(layer, config):
    assume(config.init == "paper")  # the dense init's channels and W_s: tests/test_dense_init.py
    w0 = layer.weight.detach().clone()
    parametrized(layer, config)
    p = layer.parametrizations.weight[0]
    _, _, sparse = factors_of(layer)
    U, sigma, Vh = numpy_svd(w0)
    r = p.rank
    stop = len(sigma) if config.residual_window is None else r + config.residual_window
    residual = (U[:, r:stop] * sigma[r:stop]) @ Vh[r:stop]
    scores = np.linalg.norm(residual, axis=0)
    m = max(1, math.floor(config.channel_ratio * layer.in_features))
    kept = p.channels.tolist()
    assert kept == sorted(kept) and len(kept) == m
    # every kept channel scores at least as high as every dropped one (ties may go either way)
    dropped = np.setdiff1d(np.arange(layer.in_features), kept)
    if len(dropped):
        assert scores[kept].min() >= scores[dropped].max() - 1e-9
    source = w0.numpy() if config.sparse_init == "original" else residual
    np.testing.assert_allclose(sparse.detach().numpy(), source[:, kept], rtol=0, atol=1e-10)


@PROPERTY
@given(layer=linear_layers(max_features=16), rank=st.integers(1, 3))
def test_lowrank_init_is_the_best_rank_r_approximation(layer, rank):
    w0 = layer.weight.detach().numpy().copy()
    parametrized(layer, lsparam.LowRankConfig(rank=rank))
    U, sigma, Vh = np.linalg.svd(w0, full_matrices=False)
    best = (U[:, :rank] * sigma[:rank]) @ Vh[:rank]
    np.testing.assert_allclose(layer.weight.dense().detach().numpy(), best, atol=1e-10)


@PROPERTY
@given(layer=linear_layers(), config=configs(("sltrain",)))
def test_sltrain_support_size_uniqueness_and_regeneration(layer, config):
    parametrized(layer, config)
    p = layer.parametrizations.weight[0]
    flat = p.support.flat_indices()
    # floor(δ · out · in) with out · in multiplied first (one float rounding, as documented): δ · out · in
    # from the left gives 49 for δ = 1/3 on 25 × 6 and 50 on 6 × 25
    assert flat.numel() == math.floor(config.density * (layer.out_features * layer.in_features))
    assert flat.unique().numel() == flat.numel()
    if config.init == "random":
        again = lsparam.SLTrainConfig(**{**config.__dict__})
        twin = torch.nn.Linear(layer.in_features, layer.out_features, dtype=torch.float64)
        parametrized(twin, again)
        assert torch.equal(twin.parametrizations.weight[0].support.flat_indices(), flat)


def test_sltrain_random_init_follows_the_paper():
    layer = torch.nn.Linear(64, 48, dtype=torch.float64)
    parametrized(layer, lsparam.SLTrainConfig(rank=8, density=0.1, alpha=16.0))
    B, A, values = factors_of(layer)
    bound = 1 / math.sqrt(64)
    assert torch.count_nonzero(B) == 0
    for name, drawn in (("A", A), ("values", values)):
        # Kolmogorov-Smirnov distance to U(-bound, bound) (an all-zero or one-sided draw is far from it):
        # under the uniform it exceeds 1.95/√n with probability 0.001
        x = np.sort(drawn.detach().numpy().ravel())
        n = x.size
        cdf = np.clip((x + bound) / (2 * bound), 0, 1)
        distance = max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())
        assert distance < 1.95 / math.sqrt(n), (name, distance)
        assert np.abs(x).max() <= bound, name
    # with B = 0, W starts equal to its sparse part
    assert torch.count_nonzero(layer.weight.dense()) == values.count_nonzero()


def test_sltrain_support_depends_on_seed_and_layer_name():
    def support(seed, name):
        model = torch.nn.ModuleDict({name: torch.nn.Linear(32, 32)})
        lsparam.parametrize(model, lsparam.SLTrainConfig(rank=4, density=0.1, seed=seed))
        return model[name].parametrizations.weight[0].support.flat_indices()

    assert torch.equal(support(0, "a"), support(0, "a"))
    assert not torch.equal(support(0, "a"), support(1, "a"))
    assert not torch.equal(support(0, "a"), support(0, "b"))


def test_sltrain_support_is_uniform_over_positions():
    counts = torch.zeros(16 * 16)
    draws = 400
    for i in range(draws):
        model = torch.nn.ModuleDict({f"l{i}": torch.nn.Linear(16, 16)})
        lsparam.parametrize(model, lsparam.SLTrainConfig(rank=2, density=0.25))
        counts[model[f"l{i}"].parametrizations.weight[0].support.flat_indices()] += 1
    # each position is kept with probability 0.25: Binomial(400, 0.25) has mean 100, sd 8.7
    assert counts.sum() == draws * 64
    assert counts.min() > 100 - 5 * 8.7 and counts.max() < 100 + 5 * 8.7


@PROPERTY
@given(layer=linear_layers(min_features=6, max_features=16), density=st.floats(0.1, 0.5))
def test_sltrain_dense_init_is_svd_plus_largest_residual_entries(layer, density):
    w0 = layer.weight.detach().numpy().copy()
    parametrized(layer, lsparam.SLTrainConfig(rank=2, density=density, alpha=8.0, init="dense"))
    U, sigma, Vh = np.linalg.svd(w0, full_matrices=False)
    best = (U[:, :2] * sigma[:2]) @ Vh[:2]
    residual = np.abs(w0 - best).reshape(-1)
    p = layer.parametrizations.weight[0]
    support = p.support.flat_indices().numpy()
    nnz = math.floor(density * w0.size)
    assert len(support) == nnz
    others = np.setdiff1d(np.arange(w0.size), support)
    if len(others):
        assert residual[support].min() >= residual[others].max() - 1e-12
    merged = layer.weight.dense().detach().numpy().reshape(-1)
    np.testing.assert_allclose(merged[support], w0.reshape(-1)[support], atol=1e-10)
    np.testing.assert_allclose(merged[others], best.reshape(-1)[others], atol=1e-10)


@pytest.mark.parametrize(
    "config, per_layer",
    [
        (lsparam.LowRankConfig(rank=128), lambda i, o: 128 * (i + o)),
        (lsparam.SLTrainConfig(rank=128, density=0.03), lambda i, o: 128 * (i + o) + math.floor(0.03 * i * o)),
        (lsparam.LOSTConfig(rank=128, channel_ratio=0.05), lambda i, o: 128 * (i + o) + math.floor(0.05 * i) * o),
    ],
)
def test_parameter_counts_at_llama_60m_shapes(config, per_layer):
    model = torch.nn.ModuleDict({"up": torch.nn.Linear(512, 1376, bias=False), "down": torch.nn.Linear(1376, 512, bias=False)})
    lsparam.parametrize(model, config)
    expected = per_layer(512, 1376) + per_layer(1376, 512)
    assert sum(p.numel() for p in model.parameters()) == expected


@PROPERTY
@given(layer=linear_layers(max_features=16), rank=st.integers(1, 3),
       case=st.sampled_from(["lowrank", "lost", "lost-dense", "sltrain-dense"]), gamma=st.floats(0.05, 1.0),
       alpha=st.floats(1.0, 64.0))
def test_svd_inits_split_the_singular_values_evenly_between_b_and_a(layer, rank, case, gamma, alpha):
    # B A alone does not say how the spectrum is split: B = U Σ^½, A = Σ^½ Vᵀ (each side then starts at the
    # same scale, which is what Adam's per-entry steps see) gives Bᵀ B = A Aᵀ = Σ_r, divided by the factor
    # the method scales B A by (γ for LOST's dense init, α / r for SLTrain's)
    config, divisor = {
        "lowrank": (lsparam.LowRankConfig(rank=rank), 1.0),
        "lost": (lsparam.LOSTConfig(rank=rank, gamma=gamma), 1.0),
        "lost-dense": (lsparam.LOSTConfig(rank=rank, gamma=gamma, init="dense"), gamma),
        "sltrain-dense": (lsparam.SLTrainConfig(rank=rank, density=0.1, alpha=alpha, init="dense"), alpha / rank),
    }[case]
    _, sigma, _ = numpy_svd(layer.weight)
    parametrized(layer, config)
    B, A = (f.detach().numpy() for f in factors_of(layer)[:2])
    expected = np.diag(sigma[:rank]) / divisor
    np.testing.assert_allclose(B.T @ B, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(A @ A.T, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype, work", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                         (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_the_svd_runs_in_float32_or_better(dtype, work):
    from lsparam.methods.svd import svd

    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    U, S, Vh = svd(weight)
    assert U.dtype == S.dtype == Vh.dtype == work
    reference = np.linalg.svd(weight.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(S.double().numpy(), reference, rtol=1e-5 if work == torch.float32 else 1e-12)


def test_the_checker_catches_a_wrong_forward(monkeypatch):
    layer = parametrized(torch.nn.Linear(12, 10, dtype=torch.float64), lsparam.SLTrainConfig(rank=2, density=0.2))
    p = layer.parametrizations.weight[0]
    # drop the sparse path from the fast forward: the formula and the forward no longer agree
    monkeypatch.setattr(type(p), "linear", lambda self, x, B, A, v: torch.nn.functional.linear(x, self.scale * B @ A))
    with pytest.raises(AssertionError, match="forward differs"):
        assert_decomposition(layer)


def test_the_checker_catches_a_rank_rounded_the_wrong_way(monkeypatch):
    import lsparam.methods.lowrank as lowrank

    # rank=0.35 of min(10, 12) = 3.5: floor gives 3; a rounding up would still factorise exactly as well
    monkeypatch.setattr(lowrank, "resolve_rank", lambda rank, out_f, in_f, layer="": math.ceil(rank * min(out_f, in_f)))
    layer = parametrized(torch.nn.Linear(12, 10, dtype=torch.float64), lsparam.LowRankConfig(rank=0.35))
    with pytest.raises(AssertionError, match=r"expected \(10, 3\) and \(3, 12\)"):
        assert_decomposition(layer)


def test_the_checker_catches_a_wrong_gradient(monkeypatch):
    layer = parametrized(torch.nn.Linear(12, 10, dtype=torch.float64), lsparam.LOSTConfig(rank=2))
    p = layer.parametrizations.weight[0]
    original = type(p).linear

    def detached_sparse(self, x, B, A, sparse):
        return original(self, x, B, A, sparse.detach())  # same values, no gradient for the sparse block

    monkeypatch.setattr(type(p), "linear", detached_sparse)
    with pytest.raises(AssertionError, match="gradient of sparse"):
        assert_decomposition(layer, gradcheck=False)


@pytest.mark.parametrize("backend", ["gather", "csr", "scatter"])
def test_the_checker_catches_a_wrong_gradient_behind_a_zero_factor(monkeypatch, backend):
    # SLTrain's own init has B = 0, so dA = (dY s B)ᵀ x is zero whatever the backward computes: checked at
    # init, a backward that drops dA would agree with the reference. The checker's noise on the factors
    # makes B nonzero.
    layer = parametrized(torch.nn.Linear(12, 10, dtype=torch.float64),
                         lsparam.SLTrainConfig(rank=2, density=0.2, sparse_backend=backend))
    B, _, _ = factors_of(layer)
    assert not B.any()
    p = layer.parametrizations.weight[0]
    original = type(p).linear

    def frozen_a(self, x, B, A, values):
        return original(self, x, B, A.detach(), values)  # same forward, no gradient for A

    monkeypatch.setattr(type(p), "linear", frozen_a)
    assert_decomposition(layer, gradcheck=False, perturb=False)  # blind at B = 0
    with pytest.raises(AssertionError, match="gradient of A"):
        assert_decomposition(layer, gradcheck=False)


def test_user_method_is_verified_by_the_same_checker():
    import dataclasses

    @dataclasses.dataclass
    class DiagonalPlusLowRankConfig:
        rank: int = 2

    class DiagonalPlusLowRank(lsparam.StructuredParametrization):
        method = "diag-lowrank"
        factor_names = ("B", "A", "diagonal")

        def init_factors(self, weight):
            r = self.config.rank
            B = weight[:, :r].clone()
            A = torch.eye(r, self.in_features, dtype=weight.dtype)
            return B, A, weight.diagonal().clone()

        def dense(self, B, A, diagonal):
            k = min(self.out_features, self.in_features)
            return B @ A + torch.nn.functional.pad(torch.diag(diagonal), (0, self.in_features - k, 0, self.out_features - k))

        def linear(self, x, B, A, diagonal):
            k = diagonal.numel()
            diag_part = torch.nn.functional.pad(x[..., :k] * diagonal, (0, self.out_features - k))
            return (x @ A.T) @ B.T + diag_part

    lsparam.register_method(
        "diag-lowrank",
        DiagonalPlusLowRankConfig,
        lambda cfg, layer, name: DiagonalPlusLowRank(cfg, layer.out_features, layer.in_features, name),
    )
    try:
        layer = torch.nn.Linear(9, 7, dtype=torch.float64)
        lsparam.parametrize(layer, DiagonalPlusLowRankConfig(), target_modules=None)
        assert_decomposition(layer)
    finally:
        lsparam.methods.unregister_method("diag-lowrank")
