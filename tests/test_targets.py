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
    # Exclusion rules are full matches too: a bare "q_proj" regex excludes nothing.
    assert list(select_linear_layers(llama, "all-linear", exclude_modules="q_proj")) == projection_names()
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
