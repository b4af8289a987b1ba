"""Every bad input fails early, with the right exception type, a message naming the argument and the
bad value, and (where a model is involved) leaves the model exactly as it was."""

import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

import lsparam

# ---- helpers --------------------------------------------------------------------------------------


def snapshot(model):
    """Names, classes and a deep copy of every state_dict tensor: what 'untouched' is compared to."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "classes": {name: type(m) for name, m in model.named_modules()},
        "params": [name for name, _ in model.named_parameters()],
    }


def assert_untouched(model, before, *, parametrized=()):
    """Same state_dict keys and values, same module classes, and parametrizations only on ``parametrized``."""
    state = model.state_dict()
    assert list(state) == list(before["state"]), "state_dict keys changed"
    for key, value in state.items():
        old = before["state"][key]
        assert value.dtype == old.dtype and value.shape == old.shape, key
        assert torch.equal(value, old), f"{key} changed"
    assert {name: type(m) for name, m in model.named_modules()} == before["classes"]
    assert [name for name, _ in model.named_parameters()] == before["params"]
    registered = {name for name, m in model.named_modules() if torch_parametrize.is_parametrized(m)}
    assert registered == set(parametrized)


def two_layer(first=(64, 128), second=(128, 32), seed=0):
    """``Linear(64 -> 128)``, ReLU, ``Linear(128 -> 32)``: min(in, out) is 64 for '0' and 32 for '2'."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(*first), nn.ReLU(), nn.Linear(*second))


def named(pattern, *values):
    """A regex matching a message that contains ``pattern`` and then each value (escaped), in order."""
    return ".*".join([pattern, *(re.escape(str(v)) for v in values)])


# ---- config fields, checked when the config is built ---------------------------------------------

CONFIG_CASES = [
    # (id, factory, exception, regex the message must match)
    ("rank-zero", lambda: lsparam.LowRankConfig(rank=0), ValueError, r"rank=0\b"),
    ("rank-negative", lambda: lsparam.SLTrainConfig(rank=-3), ValueError, r"rank=-3\b"),
    ("rank-str", lambda: lsparam.LowRankConfig(rank="8"), TypeError, r"rank.*'8'.*str"),
    ("rank-bool", lambda: lsparam.LOSTConfig(rank=True), TypeError, r"rank.*True.*bool"),
    ("rank-none", lambda: lsparam.LOSTConfig(rank=None), TypeError, r"rank.*None"),
    ("rank-float-above-1", lambda: lsparam.LowRankConfig(rank=1.5), ValueError, r"rank=1\.5\b"),
    ("rank-float-1", lambda: lsparam.SLTrainConfig(rank=1.0), ValueError, r"rank=1\.0\b"),
    ("rank-float-0", lambda: lsparam.LOSTConfig(rank=0.0), ValueError, r"rank=0\.0\b"),
    ("rank-nan", lambda: lsparam.LOSTConfig(rank=float("nan")), ValueError, r"rank=nan"),
    ("density-0", lambda: lsparam.SLTrainConfig(density=0), ValueError, r"density=0\b"),
    ("density-negative", lambda: lsparam.SLTrainConfig(density=-0.1), ValueError, r"density=-0\.1\b"),
    ("density-above-1", lambda: lsparam.SLTrainConfig(density=1.2), ValueError, r"density=1\.2\b"),
    ("density-str", lambda: lsparam.SLTrainConfig(density="0.1"), TypeError, r"density.*'0\.1'"),
    ("channel_ratio-0", lambda: lsparam.LOSTConfig(channel_ratio=0), ValueError, r"channel_ratio=0\b"),
    ("channel_ratio-negative", lambda: lsparam.LOSTConfig(channel_ratio=-0.1), ValueError, r"channel_ratio=-0\.1\b"),
    ("channel_ratio-above-1", lambda: lsparam.LOSTConfig(channel_ratio=1.2), ValueError, r"channel_ratio=1\.2\b"),
    ("gamma-negative", lambda: lsparam.LOSTConfig(gamma=-0.1), ValueError, r"gamma=-0\.1\b"),
    ("gamma-above-1", lambda: lsparam.LOSTConfig(gamma=1.2), ValueError, r"gamma=1\.2\b"),
    ("gamma-inf", lambda: lsparam.LOSTConfig(gamma=float("inf")), ValueError, r"gamma=inf"),
    ("activation-relu", lambda: lsparam.LOSTConfig(activation="relu"), ValueError, r"activation.*'relu'"),
    ("sparse_init", lambda: lsparam.LOSTConfig(sparse_init="zeros"), ValueError, r"sparse_init.*'zeros'"),
    ("residual_window", lambda: lsparam.LOSTConfig(residual_window=0), ValueError, r"residual_window=0\b"),
    ("sparse_backend", lambda: lsparam.SLTrainConfig(sparse_backend="cusparse"), ValueError, r"sparse_backend.*'cusparse'"),
    ("sltrain-init", lambda: lsparam.SLTrainConfig(init="svd"), ValueError, r"init.*'svd'"),
    ("alpha-0", lambda: lsparam.SLTrainConfig(alpha=0), ValueError, r"alpha=0\b"),
    ("alpha-str", lambda: lsparam.SLTrainConfig(alpha="32"), TypeError, r"alpha.*'32'"),
    ("seed-negative", lambda: lsparam.SLTrainConfig(seed=-1), ValueError, r"seed=-1\b"),
    (
        "semi-structured-density",
        lambda: lsparam.SLTrainConfig(density=0.03, sparse_backend="semi-structured"),
        ValueError,
        r"semi-structured.*density=0\.03\b",
    ),
    (
        "semi-structured-dense-init",
        lambda: lsparam.SLTrainConfig(density=0.5, sparse_backend="semi-structured", init="dense"),
        ValueError,
        r"init='dense'",
    ),
]


@pytest.mark.parametrize(
    "factory, exception, message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_config_field_is_refused_when_the_config_is_built(factory, exception, message):
    with pytest.raises(exception, match=message) as info:
        factory()
    # ValueError for a bad value, TypeError for a bad type: never the other way round, never both.
    assert type(info.value) is exception


def test_good_configs_build():
    """The boundaries of each interval are accepted (so the refusals above are not blanket ones)."""
    assert lsparam.SLTrainConfig(rank=1, density=1.0).density == 1.0
    assert lsparam.LOSTConfig(rank=0.5, channel_ratio=1.0, gamma=0.0).gamma == 0.0
    assert lsparam.LOSTConfig(gamma=1.0, activation="silu").activation == "silu"
    assert lsparam.LowRankConfig(rank=0.999).rank == 0.999
    assert lsparam.SLTrainConfig(density=0.5, sparse_backend="semi-structured").sparse_backend == "semi-structured"


def test_numpy_numbers_in_a_config_are_the_python_ones():
    import numpy as np

    from_numpy = lsparam.SLTrainConfig(rank=np.int64(4), density=np.float64(0.25), alpha=np.float32(8), seed=np.int32(3))
    assert from_numpy == lsparam.SLTrainConfig(rank=4, density=0.25, alpha=8.0, seed=3)
    assert [type(v) for v in (from_numpy.rank, from_numpy.density, from_numpy.alpha, from_numpy.seed)] == [int, float, float, int]
    layer = lsparam.parametrize(torch.nn.Linear(16, 16), from_numpy, target_modules=None)  # its spec is JSON
    assert layer.parametrizations.weight[0].rank == 4
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lsparam.LowRankConfig(rank=np.int64(0))


# ---- per-layer checks in parametrize: the model is untouched ------------------------------------


def test_int_rank_above_min_dimension_is_refused_and_model_untouched(llama):
    before = snapshot(llama)
    with pytest.raises(ValueError, match=named("rank=65 gives r=65", "model.layers.0.self_attn.q_proj", "64x64", "<= min(in, out) = 64")):
        lsparam.parametrize(llama, lsparam.LowRankConfig(rank=65))
    assert_untouched(llama, before)


def test_rank_too_large_for_a_later_layer_leaves_earlier_layers_untouched():
    """rank 40 fits layer '0' (min 64) but not layer '2' (min 32): nothing may be registered."""
    model = two_layer()
    before = snapshot(model)
    with pytest.raises(ValueError, match=named("rank=40", "'2'", "32x128", "min(in, out) = 32")):
        lsparam.parametrize(model, lsparam.SLTrainConfig(rank=40, density=0.01))
    assert_untouched(model, before)
    # The same rank on layer '0' alone is fine: the refusal above was about layer '2'.
    lsparam.parametrize(model, lsparam.SLTrainConfig(rank=40, density=0.01), target_modules=["0"])
    assert set(lsparam.structured_layers(model)) == {"0"}


def test_float_rank_rounding_to_zero_is_refused(llama):
    before = snapshot(llama)
    # 0.01 * 64 = 0.64 -> r = 0
    with pytest.raises(ValueError, match=named("rank=0.01 gives r=0", "model.layers.0.self_attn.q_proj")):
        lsparam.parametrize(llama, lsparam.LOSTConfig(rank=0.01))
    assert_untouched(llama, before)


def test_density_too_small_for_a_layer_is_refused_and_model_untouched():
    """density 1e-3 gives 16 entries on a 128x128 layer but 0 on a 4x128 one (0.512 rounds down)."""
    model = two_layer(first=(128, 128), second=(128, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match=named("density=0.001 gives no sparse entry", "'2'", "4x128")):
        lsparam.parametrize(model, lsparam.SLTrainConfig(rank=2, density=1e-3))
    assert_untouched(model, before)


def test_model_that_is_not_a_module_is_refused():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module.*dict"):
        lsparam.parametrize({"weight": torch.zeros(2, 2)}, lsparam.LowRankConfig(rank=1))


@pytest.mark.parametrize("config", [{"mlp": 8}, "sltrain", lsparam.LowRankConfig], ids=["dict", "str", "class"])
def test_unregistered_config_is_a_type_error_listing_known_methods(llama, config):
    before = snapshot(llama)
    with pytest.raises(TypeError, match=named("registered method config", "LowRankConfig", "SLTrainConfig", "LOSTConfig")) as info:
        lsparam.parametrize(llama, config)
    bad = config["mlp"] if isinstance(config, dict) else config
    assert repr(bad) in str(info.value)
    if isinstance(config, dict):
        assert "config['mlp']" in str(info.value)
    assert_untouched(llama, before)


def test_target_matching_nothing_raises_target_not_found(llama):
    before = snapshot(llama)
    with pytest.raises(lsparam.TargetNotFoundError, match=r"target_modules=\['o_projection'\].*matched no module") as info:
        lsparam.parametrize(llama, lsparam.LowRankConfig(rank=8), target_modules=["o_projection"])
    assert isinstance(info.value, ValueError)
    # The message helps: it lists real Linear names.
    assert "model.layers.0.self_attn.q_proj" in str(info.value)
    assert_untouched(llama, before)


@pytest.mark.parametrize(
    "target, matched, kind",
    [
        (r".*embed_tokens", "model.embed_tokens", "Embedding"),
        (r"model\.layers\.\d\.self_attn", "model.layers.0.self_attn", "LlamaAttention"),
        (["input_layernorm"], "model.layers.0.input_layernorm", "LlamaRMSNorm"),
    ],
    ids=["embedding", "attention-block", "norm"],
)
def test_target_that_is_not_linear_is_a_type_error(llama, target, matched, kind):
    before = snapshot(llama)
    with pytest.raises(TypeError, match=named("target_modules=", repr(target), repr(matched), kind, "nn.Linear")):
        lsparam.parametrize(llama, lsparam.LowRankConfig(rank=8), target_modules=target)
    assert_untouched(llama, before)


@pytest.mark.parametrize("target", [5, ["q_proj", 3]], ids=["int", "list-with-int"])
def test_target_of_wrong_type_is_a_type_error(llama, target):
    before = snapshot(llama)
    with pytest.raises(TypeError, match=named("target_modules", repr(target))):
        lsparam.parametrize(llama, lsparam.LowRankConfig(rank=8), target_modules=target)
    assert_untouched(llama, before)


def test_invalid_regex_is_a_value_error(llama):
    before = snapshot(llama)
    with pytest.raises(ValueError, match=named("exclude_modules=", "'(q_proj'", "not a valid regular expression")):
        lsparam.parametrize(llama, lsparam.LowRankConfig(rank=8), exclude_modules="(q_proj")
    assert_untouched(llama, before)


def test_target_none_on_a_model_that_is_not_linear(llama):
    before = snapshot(llama)
    with pytest.raises(TypeError, match=r"target_modules=None.*LlamaForCausalLM"):
        lsparam.parametrize(llama, lsparam.LowRankConfig(rank=8), target_modules=None)
    assert_untouched(llama, before)


def test_already_parametrized_layer_is_refused_and_nothing_else_changes(llama):
    lsparam.parametrize(llama, lsparam.LowRankConfig(rank=8), target_modules=["q_proj"])
    done = {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    before = snapshot(llama)
    # k_proj (new) comes after q_proj (already parametrized) in the list: neither may change.
    with pytest.raises(ValueError, match=named("layer", "'model.layers.0.self_attn.q_proj'", "already parametrized")):
        lsparam.parametrize(llama, lsparam.SLTrainConfig(rank=8, density=0.1), target_modules=["q_proj", "k_proj"])
    assert_untouched(llama, before, parametrized=done)
    # "all-linear" also sees the parametrized layer and refuses rather than skipping it silently.
    with pytest.raises(ValueError, match="already parametrized"):
        lsparam.parametrize(llama, lsparam.LowRankConfig(rank=8))
    assert_untouched(llama, before, parametrized=done)


def test_semi_structured_needs_in_features_divisible_by_4():
    # The first two layers (in_features 64) could get a 2:4 support; the last (in_features 6) cannot.
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 6), nn.Linear(6, 8))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"in_features divisible by 4.*in_features=6"):
        lsparam.parametrize(model, lsparam.SLTrainConfig(rank=2, density=0.5, sparse_backend="semi-structured"))
    assert_untouched(model, before)


def test_semi_structured_backend_on_cpu_fails_at_forward_naming_device_and_dtype():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    lsparam.parametrize(layer, lsparam.SLTrainConfig(rank=2, density=0.5, sparse_backend="semi-structured"), target_modules=None)
    # The support really is 2:4: exactly two entries in every group of four columns.
    support = layer.parametrizations.weight[0].support
    mask = torch.zeros(8, 16)
    mask.view(-1)[support.flat_indices()] = 1
    assert torch.equal(mask.view(8, 4, 4).sum(-1), torch.full((8, 4), 2.0))
    with pytest.raises(ValueError, match=named("semi-structured", "device=cpu", "dtype=torch.float32")):
        layer(torch.randn(3, 16))


def test_csr_backend_refuses_bfloat16_on_cpu_naming_the_dtype():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).to(torch.bfloat16)
    lsparam.parametrize(layer, lsparam.SLTrainConfig(rank=2, density=0.1, sparse_backend="csr"), target_modules=None)
    with pytest.raises(ValueError, match=named("sparse_backend='csr'", "torch.bfloat16")):
        layer(torch.randn(3, 16, dtype=torch.bfloat16))


# ---- SiLU-LOST has no dense form ------------------------------------------------------------------


def silu_lost_llama(llama):
    return lsparam.parametrize(llama, lsparam.LOSTConfig(rank=8, channel_ratio=0.1, activation="silu"))


def test_merge_of_silu_lost_is_refused_and_model_untouched(llama):
    silu_lost_llama(llama)
    parametrized = set(lsparam.structured_layers(llama))
    before = snapshot(llama)
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        logits = llama(ids).logits
    with pytest.raises(lsparam.NoDenseFormError, match=named("layer", "'model.layers.0.self_attn.q_proj'", "activation='silu'", "no dense form")):
        lsparam.merge(llama)
    assert_untouched(llama, before, parametrized=parametrized)
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, logits)


def test_merge_of_mixed_model_refuses_before_changing_a_mergeable_layer(llama):
    """The linear-LOST layer comes first in module order, the SiLU one last: neither may change."""
    lsparam.parametrize(llama, lsparam.LOSTConfig(rank=8), target_modules=["layers.0.self_attn.q_proj"])
    lsparam.parametrize(
        llama, lsparam.LOSTConfig(rank=8, activation="silu"), target_modules=["layers.1.mlp.down_proj"]
    )
    parametrized = {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    before = snapshot(llama)
    with pytest.raises(lsparam.NoDenseFormError, match=named("'model.layers.1.mlp.down_proj'", "no layer was changed")):
        lsparam.merge(llama)
    assert_untouched(llama, before, parametrized=parametrized)
    assert list(lsparam.structured_layers(llama)) == sorted(parametrized)


def test_silu_lost_weight_refuses_dense_use_through_torch_functions(llama):
    silu_lost_llama(llama)
    weight = llama.model.layers[0].self_attn.q_proj.weight
    # Metadata is fine...
    assert weight.shape == (64, 64) and weight.dtype == torch.float32
    # ...but every way of using the values refuses with NoDenseFormError.
    for use in (weight.dense, lambda: torch.add(weight, 0), weight.sum, lambda: torch.matmul(weight, torch.ones(64))):
        with pytest.raises(lsparam.NoDenseFormError, match=r"LOST \(activation='silu'\).*no dense equivalent"):
            use()


@pytest.mark.parametrize("op", ["add", "mul", "matmul"])
def test_silu_lost_weight_operator_raises_no_dense_form_error(llama, op):
    silu_lost_llama(llama)
    weight = llama.model.layers[0].self_attn.q_proj.weight
    use = {"add": lambda: weight + 0, "mul": lambda: weight * 2, "matmul": lambda: weight @ torch.ones(64)}[op]
    with pytest.raises(lsparam.NoDenseFormError, match="no dense equivalent"):
        use()


# ---- loading a state_dict made with another config ------------------------------------------------


SOURCE = lsparam.SLTrainConfig(rank=8, density=0.05)


@pytest.mark.parametrize(
    "other, message",
    [
        (lsparam.SLTrainConfig(rank=4, density=0.05), r"config\.rank: state_dict has 8, model has 4"),
        (lsparam.SLTrainConfig(rank=8, density=0.05, seed=1), r"config\.seed: state_dict has 0, model has 1"),
        (lsparam.SLTrainConfig(rank=8, density=0.05, alpha=16.0), r"config\.alpha: state_dict has 32\.0, model has 16\.0"),
        (lsparam.LOSTConfig(rank=8), r"method: state_dict has 'sltrain', model has 'lost'"),
        (lsparam.LowRankConfig(rank=8), r"method: state_dict has 'sltrain', model has 'lowrank'"),
    ],
    ids=["rank", "seed", "alpha", "method-lost", "method-lowrank"],
)
def test_loading_a_state_dict_of_another_config_is_refused(llama_factory, other, message):
    state = lsparam.parametrize(llama_factory(0), SOURCE).state_dict()
    target = lsparam.parametrize(llama_factory(1), other)
    with pytest.raises(ValueError, match=named("'model.layers.0.self_attn.q_proj'", "another lsparam config") + ".*" + message):
        target.load_state_dict(state)


def test_seed_mismatch_is_refused_even_though_all_shapes_agree(llama_factory):
    """The dangerous case: every tensor fits, only the (regenerated) support would differ."""
    state = lsparam.parametrize(llama_factory(0), SOURCE).state_dict()
    target = lsparam.parametrize(llama_factory(1), lsparam.SLTrainConfig(rank=8, density=0.05, seed=1))
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"seed"):
        target.load_state_dict(state)


def test_refused_load_leaves_the_model_untouched(llama_factory):
    state = lsparam.parametrize(llama_factory(0), SOURCE).state_dict()
    target = lsparam.parametrize(llama_factory(1), lsparam.SLTrainConfig(rank=8, density=0.05, seed=1))
    before = snapshot(target)
    with pytest.raises(ValueError, match="seed"):
        target.load_state_dict(state)
    assert_untouched(target, before, parametrized=set(lsparam.structured_layers(target)))


def test_numpy_float_rank_is_a_fraction():
    import numpy as np

    from lsparam.config import resolve_rank

    assert resolve_rank(np.float32(0.25), 64, 128) == 16
    assert resolve_rank(np.int64(8), 64, 128) == 8


def test_exclude_modules_all_linear_is_refused(llama):
    with pytest.raises(ValueError, match="exclude_modules='all-linear'"):
        lsparam.parametrize(llama, lsparam.LowRankConfig(rank=4), exclude_modules="all-linear")
