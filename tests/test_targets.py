"""Which modules parametrize touches: PEFT's rules, checked on a tiny LLaMA."""

import re

import pytest
import torch
from torch import nn

import lsparam
from lsparam.targets import select_linear_layers

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LAYERS = 2


def projection_names(projections=PROJECTIONS, layers=range(LAYERS)):
    """Full names, in model order, written out independently of the selection code."""
    return [f"model.layers.{i}.{BLOCK[p]}.{p}" for i in layers for p in PROJECTIONS if p in projections]


def parametrized_names(model):
    return list(lsparam.structured_layers(model))


RANK8 = lsparam.LowRankConfig(rank=8)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_all_linear_selects_the_seven_projections_per_layer_and_not_lm_head(llama_factory, tie):
    model = llama_factory(0, tie_word_embeddings=tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    assert list(select_linear_layers(model)) == projection_names()
    lsparam.parametrize(model, RANK8)
    assert parametrized_names(model) == projection_names()
    assert len(parametrized_names(model)) == 7 * LAYERS
    # lm_head is a plain Linear with its own dense weight (and still tied when it was).
    assert type(model.lm_head) is nn.Linear
    assert type(model.lm_head.weight) is nn.Parameter
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie


def test_regex_string_must_match_the_full_name(llama):
    assert list(select_linear_layers(llama, r".*\.q_proj")) == projection_names(["q_proj"])
    # Sanity of the rule itself: re.search would have matched, re.fullmatch does not.
    assert re.search("q_proj", "model.layers.0.self_attn.q_proj")
    with pytest.raises(lsparam.TargetNotFoundError, match=r"target_modules='q_proj'"):
        select_linear_layers(llama, "q_proj")
    with pytest.raises(lsparam.TargetNotFoundError):
        lsparam.parametrize(llama, RANK8, target_modules=r"layers\.0\.self_attn\.q_proj")  # no leading "model."
    assert parametrized_names(llama) == []
    lsparam.parametrize(llama, RANK8, target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj")
    assert parametrized_names(llama) == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_list_matches_exact_names_and_dotted_suffixes(llama):
    assert list(select_linear_layers(llama, ["q_proj", "v_proj"])) == projection_names(["q_proj", "v_proj"])
    assert list(select_linear_layers(llama, ["mlp.up_proj"])) == projection_names(["up_proj"])
    assert list(select_linear_layers(llama, ["model.layers.1.self_attn.o_proj"])) == ["model.layers.1.self_attn.o_proj"]
    assert list(select_linear_layers(llama, ["0.self_attn.k_proj"])) == ["model.layers.0.self_attn.k_proj"]
    assert list(select_linear_layers(llama, ["lm_head"])) == ["lm_head"]  # explicit: allowed when untied


@pytest.mark.parametrize("names", [["proj"], ["attn.q_proj"], ["_proj"], ["layers.0.self_attn.q"]])
def test_list_does_not_match_substrings(llama, names):
    """'proj' is a substring of 'q_proj' but not a dotted suffix; 'attn.q_proj' splits 'self_attn'."""
    with pytest.raises(lsparam.TargetNotFoundError, match=re.escape(repr(names))):
        lsparam.parametrize(llama, RANK8, target_modules=names)
    assert parametrized_names(llama) == []


def test_exclude_modules_removes_matches(llama):
    kept = select_linear_layers(llama, r".*_proj", exclude_modules=r".*\.mlp\..*")
    assert list(kept) == projection_names(["q_proj", "k_proj", "v_proj", "o_proj"])
    kept = select_linear_layers(llama, "all-linear", exclude_modules=["k_proj", "mlp.down_proj"])
    assert list(kept) == projection_names(["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    kept = select_linear_layers(llama, ["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"])
    assert list(kept) == ["model.layers.1.self_attn.q_proj"]
    # Exclusion rules are full matches too: a bare "q_proj" regex matches no module, an error (not a no-op)
    with pytest.raises(lsparam.TargetNotFoundError, match=r"exclude_modules='q_proj' matched no module.*re\.fullmatch"):
        lsparam.parametrize(llama, RANK8, exclude_modules="q_proj")
    assert parametrized_names(llama) == []
    lsparam.parametrize(llama, RANK8, exclude_modules=r".*self_attn.*")
    assert parametrized_names(llama) == projection_names(["gate_proj", "up_proj", "down_proj"])
    for name in projection_names(["q_proj", "k_proj", "v_proj", "o_proj"]):
        assert type(llama.get_submodule(name)) is nn.Linear


def test_excluding_everything_is_target_not_found(llama):
    with pytest.raises(lsparam.TargetNotFoundError, match=r"exclude_modules='\.\*'"):
        lsparam.parametrize(llama, RANK8, exclude_modules=".*")
    assert parametrized_names(llama) == []


@pytest.mark.parametrize("target", [["lm_head"], r"lm_head"], ids=["list", "regex"])
def test_explicit_target_of_a_tied_lm_head_is_refused(llama_factory, target):
    model = llama_factory(0, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"layer 'lm_head' shares its weight with an input embedding"):
        lsparam.parametrize(model, RANK8, target_modules=target)
    assert parametrized_names(model) == []
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_lm_head_can_be_targeted_explicitly(llama):
    lsparam.parametrize(llama, RANK8, target_modules=["lm_head"])
    assert parametrized_names(llama) == ["lm_head"]
    assert sum(p.numel() for p in llama.lm_head.parameters()) == 8 * (64 + 128)


def test_embeddings_norms_and_lm_head_stay_dense(llama_factory):
    model = llama_factory(0)
    reference = llama_factory(0)  # same seed: same initial values
    lsparam.parametrize(model, lsparam.SLTrainConfig(rank=8, density=0.1))
    dense = {
        name: module
        for name, module in reference.named_modules()
        if name and not any(name.endswith(p) for p in PROJECTIONS) and not list(module.children())
    }
    kinds = {type(m).__name__ for m in dense.values()}
    assert {"Embedding", "LlamaRMSNorm", "Linear"} <= kinds  # Linear: the lm_head
    for name, ref in dense.items():
        module = model.get_submodule(name)
        assert type(module) is type(ref), name
        ref_params = dict(ref.named_parameters())
        params = dict(module.named_parameters())
        assert list(params) == list(ref_params), name
        for key in params:
            assert type(params[key]) is nn.Parameter, f"{name}.{key}"
            assert torch.equal(params[key], ref_params[key]), f"{name}.{key}"
    # And the dense parameters by their full names, as a checkpoint would see them.
    names = {n for n, _ in model.named_parameters()}
    expected_dense = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected_dense |= {f"model.layers.{i}.{n}.weight" for i in range(LAYERS) for n in ("input_layernorm", "post_attention_layernorm")}
    assert expected_dense <= names
    assert {n for n in names if "parametrizations" not in n} == expected_dense


# ---- mistakes are caught: typos, unsupported modules -------------------------------------------


def test_a_list_entry_matching_no_module_is_an_error_naming_it(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(lsparam.TargetNotFoundError, match=r"\['nope'\] matched no module"):
        lsparam.parametrize(llama, RANK8, target_modules=["q_proj", "nope"])
    with pytest.raises(lsparam.TargetNotFoundError, match=r"exclude_modules=.*\['k_prj'\] matched no module"):
        lsparam.parametrize(llama, RANK8, exclude_modules=["k_prj"])
    assert parametrized_names(llama) == []
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_list_entries_do_not_match_the_factors_own_modules(llama):
    """After a first call, "0" must not suffix-match ``...parametrizations.weight.0``."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    lsparam.parametrize(model, lsparam.LowRankConfig(rank=2), target_modules=["2"])
    lsparam.parametrize(model, lsparam.LowRankConfig(rank=2), target_modules=["0"])
    assert parametrized_names(model) == ["0", "2"]


def test_multihead_attention_out_proj_is_skipped_by_all_linear_and_refused_by_name():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    assert list(select_linear_layers(layer)) == ["linear1", "linear2"]
    for target in (["out_proj"], r"self_attn\.out_proj", lambda module, name: True):
        with pytest.raises(ValueError, match=r"'self_attn.out_proj' is the out_proj of the nn.MultiheadAttention 'self_attn'"):
            lsparam.parametrize(layer, RANK8, target_modules=target)
        assert parametrized_names(layer) == []
    lsparam.parametrize(layer)  # the default (SiLU LOST) used to fail at forward time here
    assert layer(torch.randn(2, 5, 32)).shape == (2, 5, 32)


# ---- a callable filter ----------------------------------------------------------------------------


def test_callable_filter_is_asked_about_every_linear_layer_with_module_and_name(llama):
    asked = []

    def wide_outputs(module, name):
        asked.append((type(module).__name__, name))
        return module.in_features > 64

    assert list(select_linear_layers(llama, wide_outputs)) == projection_names(["down_proj"])
    linear_names = [n for n, m in llama.named_modules() if isinstance(m, nn.Linear)]
    assert asked == [("Linear", n) for n in linear_names]  # lm_head too: it is asked, and said no
    kept = select_linear_layers(llama, "all-linear", exclude_modules=lambda module, name: name.endswith("q_proj"))
    assert "model.layers.0.self_attn.q_proj" not in kept and len(kept) == 6 * LAYERS


def test_a_callable_filter_choosing_a_tied_head_is_refused(llama_factory):
    model = llama_factory(0, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="shares its weight with an input embedding"):
        lsparam.parametrize(model, RANK8, target_modules=lambda module, name: name == "lm_head")


@pytest.mark.parametrize("bad", [42, {"q_proj": 1}, [1, 2]], ids=["int", "dict", "list-of-ints"])
def test_a_target_that_is_no_rule_is_a_type_error(llama, bad):
    with pytest.raises(TypeError, match=r"target_modules must be 'all-linear', a regex string, a list of module names or a callable"):
        lsparam.parametrize(llama, RANK8, target_modules=bad)


# ---- one config per pattern ------------------------------------------------------------------------


MIXED = {r"\.mlp\.": lsparam.SLTrainConfig(rank=8, density=0.05), r"\.self_attn\.": lsparam.LOSTConfig(rank=8)}


def test_per_pattern_configs_give_each_layer_its_method(llama):
    lsparam.parametrize(llama, MIXED)
    methods = {name: p.method for name, (_, p) in lsparam.structured_layers(llama).items()}
    assert methods == {name: "sltrain" if ".mlp." in name else "lost" for name in projection_names()}


def test_layers_no_pattern_matches_stay_dense(llama):
    lsparam.parametrize(llama, {r"\.mlp\.up_proj$": RANK8})
    assert parametrized_names(llama) == projection_names(["up_proj"])


@pytest.mark.parametrize(
    "config, error, message",
    [
        ({r"\.mlp\.": RANK8, r"up_proj": RANK8}, ValueError, r"layer 'model.layers.0.mlp.up_proj' matches config patterns '.*mlp.*' and 'up_proj'"),
        ({r"\.mlp\.": RANK8, r"\.ffn\.": RANK8}, lsparam.TargetNotFoundError, r"config patterns \[.*ffn.*\] match no selected layer"),
        ({}, ValueError, r"config is an empty dict"),
        ({1: RANK8}, TypeError, r"keys of a config dict are regex strings; got 1"),
        ({"(": RANK8}, ValueError, r"config key '\(' is not a valid regular expression"),
    ],
    ids=["overlap", "unused-pattern", "empty", "non-str-key", "bad-regex"],
)
def test_bad_per_pattern_configs_are_refused_with_the_model_untouched(llama, config, error, message):
    with pytest.raises(error, match=message):
        lsparam.parametrize(llama, config)
    assert parametrized_names(llama) == []


def test_a_mixed_model_round_trips_summarises_merges_and_exports(llama_factory, tmp_path):
    import lsparam.hf
    from transformers import LlamaForCausalLM

    model = lsparam.parametrize(llama_factory(0), MIXED)
    ids = torch.randint(0, 128, (2, 12))
    logits = model(ids).logits
    # state_dict into a model parametrized the same way from another init
    twin = lsparam.parametrize(llama_factory(1), MIXED)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin(ids).logits, logits)
    # a saved folder rebuilds both methods from the specs alone
    lsparam.hf.save_parametrized(model, tmp_path / "parametrized")
    rebuilt = lsparam.hf.load_parametrized(tmp_path / "parametrized")
    assert {n: p.method for n, (_, p) in lsparam.structured_layers(rebuilt).items()} == {
        n: p.method for n, (_, p) in lsparam.structured_layers(model).items()
    }
    assert torch.equal(rebuilt(ids).logits, logits)
    # summary lists both methods
    methods = {line.split()[1] for line in lsparam.summary(model).splitlines()[1:-2]}
    assert methods == {"sltrain", "lost"}
    # dense export loads in vanilla transformers; merge gives the same function
    lsparam.hf.save_pretrained(model, tmp_path / "dense")
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(dense(ids).logits, logits, atol=1e-5, rtol=1e-5)
    lsparam.merge(model)
    assert parametrized_names(model) == []
    torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=1e-5)


# ---- configs that save nothing ----------------------------------------------------------------------


def test_one_warning_names_every_layer_that_saves_nothing():
    """64x64 at rank 32 holds 32·128 = 4,096 = 64·64 parameters: nothing saved; rank 31 saves."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 256))
    with pytest.warns(lsparam.NoSavingWarning) as record:
        lsparam.parametrize(model, lsparam.LowRankConfig(rank=32))
    assert len(record) == 1
    message = str(record[0].message)
    assert "0 (lowrank, 4,096 >= 4,096)" in message and "1 (lowrank, 4,096 >= 4,096)" in message
    assert "'2'" not in message and " 2 (" not in message  # 32·320 = 10,240 < 16,384
    assert "r < in*out / (in + out)" in message
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lsparam.parametrize(nn.Sequential(nn.Linear(64, 64)), lsparam.LowRankConfig(rank=31))


def test_a_sparse_part_counts_towards_the_saving():
    """rank 28 alone saves on 64x64 (3,584 < 4,096); with 13% density (532 entries) it does not."""
    with pytest.warns(lsparam.NoSavingWarning, match=r"sltrain, 4,116 >= 4,096"):
        lsparam.parametrize(nn.Sequential(nn.Linear(64, 64)), lsparam.SLTrainConfig(rank=28, density=0.13))
