"""CoLA (``y = B σ(A x)``): its forward and gradients against formulas written here, its memory-saving
backward, the paper's init, whole models, the refusals of a weight with no dense form, loading, the
config's checks and the per-size presets."""

import math

import pytest
import torch
import torch.utils.checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lsparam
import lsparam.io
from lsparam import presets
from lsparam.methods.cola import _CoLALinear

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ACTIVATIONS = ("silu", "gelu", "relu")


def act(name, p):
    """The activations from their definitions (not torch.nn.functional)."""
    if name == "silu":
        return p / (1 + torch.exp(-p))
    if name == "gelu":
        return p * 0.5 * (1 + torch.erf(p / math.sqrt(2)))
    return torch.where(p > 0, p, torch.zeros_like(p))


def cola_layer(in_features, out_features, config, *, bias=True, dtype=torch.float64, name=""):
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    if not name:
        return lsparam.parametrize(layer, config, target_modules=None)
    return getattr(lsparam.parametrize(nn.ModuleDict({name: layer}), config), name)


def factors(layer):
    plist = layer.parametrizations.weight
    return plist.original0, plist.original1  # B (out×r), A (r×in)


# ---- (a) the forward and its gradients against y = B σ(A xᵀ) + b, written out -------------------------------


@pytest.mark.filterwarnings("ignore::lsparam.NoSavingWarning")  # tiny layers at high rank save nothing
@PROPERTY
@given(
    in_features=st.integers(1, 24), out_features=st.integers(1, 24), rank_fraction=st.floats(0.01, 1.0),
    activation=st.sampled_from(ACTIVATIONS), checkpoint=st.booleans(), bias=st.booleans(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), seed=st.integers(0, 2**16),
)
def test_forward_and_gradients_match_the_formula(in_features, out_features, rank_fraction, activation, checkpoint,
                                                  bias, lead, seed):
    rank = max(1, math.floor(rank_fraction * min(in_features, out_features)))
    config = lsparam.CoLAConfig(rank=rank, activation=activation, checkpoint=checkpoint, seed=seed)
    layer = cola_layer(in_features, out_features, config, bias=bias)
    B, A = factors(layer)
    assert tuple(B.shape) == (out_features, rank) and tuple(A.shape) == (rank, in_features)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_features, dtype=torch.float64, generator=generator, requires_grad=True)
    upstream = torch.randn(*lead, out_features, dtype=torch.float64, generator=generator)

    y = layer(x)
    tokens = x.reshape(-1, in_features)
    expected = (B @ act(activation, A @ tokens.T)).T.reshape(*lead, out_features)  # B σ(A xᵀ), a column per token
    if bias:
        expected = expected + layer.bias
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    wrt = (x, B, A, *([layer.bias] if bias else []))
    for got, want in zip(torch.autograd.grad(y, wrt, upstream), torch.autograd.grad(expected, wrt, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_the_shared_property_checker_covers_cola():
    from lsparam.testing import assert_decomposition

    for activation in ACTIVATIONS:
        assert_decomposition(cola_layer(12, 10, lsparam.CoLAConfig(rank=3, activation=activation)))


# ---- (b) the official layer's formula ------------------------------------------------------------------------


class OfficialColaLayer(nn.Module):
    """The reference implementation's layer, written from the paper: ``cola_a`` is in×r, ``cola_b`` r×out,
    ``out = act(x @ cola_a) @ cola_b + bias``, each factor drawn as ``randn / r^(1/4) · ((in + out)^(-1/2))^(1/2)``."""

    def __init__(self, in_features, out_features, rank, activation):
        super().__init__()
        target_sdv = (in_features + out_features) ** (-1 / 2)
        self.init_std = target_sdv ** (1 / 2) / rank ** (1 / 4)
        self.cola_a = nn.Parameter(torch.randn(in_features, rank, dtype=torch.float64) * self.init_std)
        self.cola_b = nn.Parameter(torch.randn(rank, out_features, dtype=torch.float64) * self.init_std)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.float64))
        self.activation = activation

    def forward(self, x):
        return act(self.activation, torch.matmul(x, self.cola_a)) @ self.cola_b + self.bias


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_same_function_as_the_official_layer_with_the_same_factors(activation):
    layer = cola_layer(20, 14, lsparam.CoLAConfig(rank=5, activation=activation))
    official = OfficialColaLayer(20, 14, 5, activation)
    B, A = factors(layer)
    with torch.no_grad():
        official.cola_a.copy_(A.T)
        official.cola_b.copy_(B.T)
        official.bias.copy_(layer.bias)
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    torch.testing.assert_close(layer(x), official(x), rtol=1e-12, atol=1e-12)


def test_same_function_as_lost_silu_without_its_sparse_part():
    """LOST-SiLU with γ = 1 is γ·SiLU(x Aᵀ) Bᵀ + 0: CoLA's function on the same factors."""
    cola = cola_layer(16, 12, lsparam.CoLAConfig(rank=4), bias=False)
    lost = cola_layer(16, 12, lsparam.LOSTConfig(rank=4, gamma=1.0, activation="silu"), bias=False)
    with torch.no_grad():
        lost.parametrizations.weight.original0.copy_(factors(cola)[0])
        lost.parametrizations.weight.original1.copy_(factors(cola)[1])
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(cola(x), lost(x), rtol=1e-12, atol=1e-12)


# ---- (c) gradcheck, and what checkpoint=True keeps for backward ----------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("checkpoint", [False, True])
def test_gradcheck(activation, checkpoint):
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)
              for shape in ((2, 3, 6), (5, 3), (3, 6))]  # x, B, A
    assert torch.autograd.gradcheck(lambda x, B, A: _CoLALinear.apply(x, B, A, activation, checkpoint), inputs)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_checkpoint_gives_the_same_output_and_gradients(activation):
    grads = {}
    for checkpoint in (False, True):
        torch.manual_seed(0)  # the same bias
        layer = cola_layer(24, 16, lsparam.CoLAConfig(rank=6, activation=activation, checkpoint=checkpoint),
                           dtype=torch.float32)
        x = torch.randn(4, 7, 24, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y = layer(x)
        y.square().sum().backward()
        grads[checkpoint] = [y.detach(), x.grad, *(p.grad for p in layer.parameters())]
    for plain, recomputed in zip(grads[False], grads[True]):
        torch.testing.assert_close(recomputed, plain, rtol=1e-6, atol=1e-7)


def saved_activation_bytes(forward, owned):
    """Bytes autograd saves during ``forward()`` in tensors whose storage is none of ``owned``'s."""
    owned_storages = {t.untyped_storage().data_ptr() for t in owned}
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in owned_storages:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved)


def test_checkpoint_saves_no_rank_sized_activation():
    tokens, rank, itemsize = 2 * 50, 8, 4
    layer = cola_layer(64, 48, lsparam.CoLAConfig(rank=rank), bias=False, dtype=torch.float32)
    recomputing = cola_layer(64, 48, lsparam.CoLAConfig(rank=rank, checkpoint=True), bias=False, dtype=torch.float32)
    x = torch.randn(2, 50, 64, requires_grad=True)

    plain = saved_activation_bytes(lambda: layer(x), [x, *factors(layer)])
    recomputed = saved_activation_bytes(lambda: recomputing(x), [x, *factors(recomputing)])
    B, A = factors(layer)
    autograd = saved_activation_bytes(lambda: nn.functional.linear(nn.functional.silu(x @ A.T), B), [x, B, A])
    assert plain == tokens * rank * itemsize  # x Aᵀ only
    assert recomputed == 0  # only x and the factors, which exist anyway
    assert autograd == 2 * tokens * rank * itemsize  # autograd on the same ops: x Aᵀ and σ(x Aᵀ)


def test_checkpoint_under_autocast_recomputes_at_the_forward_precision():
    grads = {}
    for checkpoint in (False, True):
        torch.manual_seed(0)  # the same bias
        layer = cola_layer(32, 24, lsparam.CoLAConfig(rank=8, checkpoint=checkpoint), dtype=torch.float32)
        x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        grads[checkpoint] = [x.grad, *(p.grad for p in layer.parameters())]
        assert all(g.dtype == torch.float32 for g in grads[checkpoint])
    for plain, recomputed in zip(grads[False], grads[True]):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


# ---- (d) the paper's init -----------------------------------------------------------------------------------


def test_init_statistics_follow_the_paper():
    in_features, out_features, rank = 600, 400, 64
    layer = cola_layer(in_features, out_features, lsparam.CoLAConfig(rank=rank), bias=False)
    B, A = (f.detach() for f in factors(layer))
    official_std = OfficialColaLayer(in_features, out_features, rank, "silu").init_std
    for factor in (B, A):  # 25,600 and 38,400 draws: the std estimate is within 1% with overwhelming odds
        assert abs(factor.mean().item()) < 0.03 * official_std
        assert factor.std().item() == pytest.approx(official_std, rel=0.03)
    # B A has the scale of a dense init with std 1/√(in + out) ...
    dense_std = 1 / math.sqrt(in_features + out_features)
    assert (B @ A).std().item() == pytest.approx(dense_std, rel=0.05)
    # ... so the linear product maps unit inputs to outputs of std √(in / (in + out)), as such a dense layer does
    x = torch.randn(2000, in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = torch.randn(out_features, in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = math.sqrt(in_features / (in_features + out_features))
    assert (x @ (dense * dense_std).T).std().item() == pytest.approx(expected, rel=0.05)
    assert (x @ A.T @ B.T).std().item() == pytest.approx(expected, rel=0.05)


def test_init_is_seeded_per_layer_and_ignores_the_weight_and_the_global_rng():
    def drawn(seed=0, name="a", checkpoint=False, weight_seed=0):
        torch.manual_seed(weight_seed)  # a different dense weight
        layer = cola_layer(16, 12, lsparam.CoLAConfig(rank=4, seed=seed, checkpoint=checkpoint), name=name)
        return torch.cat([f.detach().reshape(-1) for f in factors(layer)])

    reference = drawn()
    assert torch.equal(drawn(weight_seed=1), reference)
    assert torch.equal(drawn(checkpoint=True), reference)
    assert not torch.equal(drawn(seed=1), reference)
    assert not torch.equal(drawn(name="b"), reference)
    layer = nn.Linear(16, 12)
    state = torch.get_rng_state()
    lsparam.parametrize(layer, lsparam.CoLAConfig(rank=4), target_modules=None)
    assert torch.equal(torch.get_rng_state(), state)


# ---- (e) whole models ----------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_key_value_heads=2)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=16)),
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(**TINY, max_position_embeddings=16)),
}


def model_run(family, checkpoint, recompute_model=False):
    torch.manual_seed(0)
    model = MODELS[family]().eval()
    lsparam.parametrize(model, lsparam.CoLAConfig(rank=4, checkpoint=checkpoint))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    if recompute_model:  # an outer activation checkpoint around CoLA's own recompute
        logits = torch.utils.checkpoint.checkpoint(lambda i: model(input_ids=i).logits, ids, use_reentrant=False)
    else:
        logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    return model, logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", list(MODELS))
def test_models_run_forward_and_backward_and_checkpoint_changes_nothing(family):
    model, logits, grads = model_run(family, checkpoint=False)
    layers = lsparam.structured_layers(model)
    assert layers and all(p.method == "cola" for _, p in layers.values())
    if family == "gpt2":
        assert all(p.transposed for _, p in layers.values())  # Conv1D: factorised on its out×in matrix
    assert logits.shape == (2, 8, 64) and torch.isfinite(logits).all()
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    factor_grads = [g for n, g in grads.items() if ".parametrizations.weight.original" in n]
    assert len(factor_grads) == 2 * len(layers) and all(g.abs().sum() > 0 for g in factor_grads)
    for variant in ({"checkpoint": True}, {"checkpoint": True, "recompute_model": True}):
        _, other_logits, other_grads = model_run(family, **variant)
        torch.testing.assert_close(other_logits, logits, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(other_grads[name], g, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


# ---- (f) merge and dense export refuse ----------------------------------------------------------------------


def test_merge_and_dense_export_refuse_naming_cola_and_why(tmp_path):
    model, _, _ = model_run("llama", checkpoint=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    why = r"\(cola, CoLAConfig\(.*\)\) has no dense form \(a nonlinearity sits between its factors\)"
    with pytest.raises(lsparam.NoDenseFormError, match=why + " and cannot be merged"):
        lsparam.merge(model)
    with pytest.raises(lsparam.NoDenseFormError, match=why + " and cannot be exported"):
        lsparam.io.dense_state_dict(model)
    with pytest.raises(lsparam.NoDenseFormError, match=why):
        lsparam.io.save_pretrained(model, tmp_path)
    layer = model.model.layers[0].mlp.down_proj
    with pytest.raises(lsparam.NoDenseFormError, match=r"CoLA \(activation='silu'\).*nonlinearity between the factors"):
        layer.weight.dense()
    with pytest.raises(lsparam.NoDenseFormError, match="CoLA"):
        layer.weight + 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing changed
    assert len(lsparam.structured_layers(model)) == 14


# ---- (g) loading ---------------------------------------------------------------------------------------------


def test_state_dict_round_trip_into_a_fresh_model(llama_factory):
    trained = lsparam.parametrize(llama_factory(0), lsparam.CoLAConfig(rank=8))
    with torch.no_grad():  # factors that no init would give
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids = torch.arange(12).view(1, 12)
    # another dense init, another init seed, CoLA-M: none of them is part of what the factors mean
    fresh = lsparam.parametrize(llama_factory(1), lsparam.CoLAConfig(rank=8, seed=5, checkpoint=True))
    assert not torch.equal(fresh(ids).logits, trained(ids).logits)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh(ids).logits, trained(ids).logits)


def test_save_and_load_parametrized_rebuild_the_cola_model(llama_factory, tmp_path):
    model = lsparam.parametrize(llama_factory(0), lsparam.CoLAConfig(rank=8, activation="gelu", checkpoint=True))
    lsparam.io.save_parametrized(model, tmp_path)
    loaded = lsparam.io.load_parametrized(tmp_path)
    configs = [p.config for _, p in lsparam.structured_layers(loaded).values()]
    assert len(configs) == 14 and all(c == lsparam.CoLAConfig(rank=8, activation="gelu", checkpoint=True) for c in configs)
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("other", "difference"),
    [
        (lsparam.LOSTConfig(rank=8, activation="silu"), r"method: state_dict has 'cola', model has 'lost'"),
        (lsparam.CoLAConfig(rank=4), r"config.rank: state_dict has 8, model has 4"),
        (lsparam.CoLAConfig(rank=8, activation="relu"), r"config.activation: state_dict has 'silu', model has 'relu'"),
    ],
)
def test_a_cola_state_dict_is_refused_by_another_config(llama_factory, other, difference):
    state = lsparam.parametrize(llama_factory(0), lsparam.CoLAConfig(rank=8)).state_dict()
    target = lsparam.parametrize(llama_factory(1), other)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=f"made with another lsparam config: .*{difference}"):
        target.load_state_dict(state)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


# ---- (h) the config's checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rank": 0}, ValueError, r"rank must be a positive int .*got rank=0"),
        ({"rank": 1.5}, ValueError, r"must lie in \(0, 1\); got rank=1.5"),
        ({"rank": "8"}, TypeError, r"rank must be an int .*got '8'"),
        ({"activation": "tanh"}, ValueError, r"activation must be one of \['silu', 'gelu', 'relu'\]; got activation='tanh'"),
        ({"activation": None}, ValueError, r"activation must be one of .*; got activation=None"),
        ({"checkpoint": "yes"}, TypeError, r"checkpoint must be True or False; got checkpoint='yes'"),
        ({"checkpoint": 1}, TypeError, r"checkpoint must be True or False; got checkpoint=1"),
        ({"seed": -1}, ValueError, r"seed must be a non-negative int; got seed=-1"),
        ({"init": "dense"}, ValueError, r"init='dense'.*CoLA has no dense form \(a nonlinearity sits between the factors\)"),
        ({"init": "paper"}, ValueError, r"init must be one of \['random'\]; got init='paper'"),
    ],
)
def test_bad_config_values_are_refused_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        lsparam.CoLAConfig(**kwargs)


def test_a_rank_too_large_for_a_layer_is_refused_with_the_model_untouched():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"rank=8 gives r=8 for layer '1' of shape 4x16"):
        lsparam.parametrize(model, lsparam.CoLAConfig(rank=8))
    assert lsparam.structured_layers(model) == {}


# ---- presets -------------------------------------------------------------------------------------------------

# The reference code's model configs (rank) and training scripts (lr, warmup steps / steps), per LLaMA size.
OFFICIAL = {"llama_60m": (128, 0.006, 2000 / 10000), "llama_130m": (256, 0.003, 2000 / 20000),
            "llama_350m": (256, 0.003, 6000 / 60000), "llama_1b": (512, 0.002, 10000 / 100000),
            "llama_7b": (1024, 0.001, 15000 / 150000)}


def test_presets_give_the_official_settings_per_size():
    assert "cola" in presets.METHODS
    for size, (rank, lr, warmup) in OFFICIAL.items():
        assert presets.method_config("cola", size) == lsparam.CoLAConfig(rank=rank)
        assert presets.default_lr("cola", size) == pytest.approx(lr)
        assert presets.training_defaults("cola", size) == pytest.approx(
            {"weight_decay": 0.01, "clip_norm": 0.5, "warmup": warmup, "min_lr_ratio": 0.1})
    for size in ("llama_9m", "llama_20m"):  # not in the paper: a quarter of the hidden size
        assert presets.method_config("cola", size).rank == presets.LLAMA_SIZES[size][0] // 4
        assert presets.default_lr("cola", size) == presets.DEFAULT_LR["cola"]
    assert presets.method_config("cola").rank == 0.25
    assert presets.training_defaults("lost-silu", "llama_60m") == {}
    with pytest.raises(ValueError, match=r"method must be one of .*; got method='colaa'"):
        presets.default_lr("colaa")
