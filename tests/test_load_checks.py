"""Loaders validate before they copy: a state_dict or optimizer state made for something else is refused
with a message naming the tensor, and the model or optimizer is left exactly as it was."""

import pytest
import torch

import lsparam
from lsparam.optim import LeanOptimizer


def trained_optimizer(out_features, state_bits=32, per_layer=False, fused=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, out_features), torch.nn.Linear(out_features, 64))
    extra = {} if fused is None else {"fused": fused}
    optimizer = LeanOptimizer(model, torch.optim.AdamW, lr=1e-3, state_bits=state_bits, per_layer=per_layer, **extra)
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def flat(state):
    """Every tensor of an optimizer state_dict, by path (low-bit states are dicts of plain tensors)."""
    out = {}

    def walk(value, path):
        if isinstance(value, torch.Tensor):
            out[path] = value.clone()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}/{i}")
    walk(state, "")
    return out


@pytest.mark.parametrize("state_bits, per_layer, fused", [(32, False, True), (32, False, False), (32, True, None), (8, False, None)],
                         ids=["fused", "unfused", "per-layer", "8-bit"])
def test_optimizer_state_of_other_shapes_is_refused_before_loading(state_bits, per_layer, fused):
    """Same parameter count, other shapes: AdamW's fused kernel and torchao's 8-bit one would corrupt
    memory (or silently use wrong states) instead of raising."""
    _, source = trained_optimizer(128, state_bits, per_layer, fused)
    _, target = trained_optimizer(96, state_bits, per_layer, fused)
    before = flat(target.state_dict())
    with pytest.raises(ValueError, match=r"optimizer state 'exp_avg' of '0\.weight' has shape \(128, 64\), but the "
                                         r"parameter it updates has \(96, 64\)"):
        target.load_state_dict(source.state_dict())
    after = flat(target.state_dict())
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # the same shapes still load
    _, twin = trained_optimizer(128, state_bits, per_layer, fused)
    twin.load_state_dict(source.state_dict())


def test_a_pending_gradient_of_another_shape_is_refused():
    model, source = trained_optimizer(128)
    state = source.state_dict()
    state["pending_grads"] = {"0": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"pending gradient of '0\.weight' has shape \(3, 3\)"):
        source.load_state_dict(state)


def parametrized_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(config), lambda model: lsparam.parametrize(model, lsparam.SLTrainConfig(rank=8, density=0.05))


def corrupt(state, how):
    """A copy of ``state`` with the *last* layer's factor spoilt (so a copy-then-fail loader would already
    have overwritten the embeddings and every earlier layer), and the embedding changed."""
    state = {k: v.clone() for k, v in state.items()}
    key = [k for k in state if k.endswith("parametrizations.weight.original1")][-1]
    if how == "nan":
        state[key][0, 0] = float("nan")
    elif how == "shape":
        state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    elif how == "missing":
        del state[key]
    state["model.embed_tokens.weight"] += 1.0
    return state, key


@pytest.mark.parametrize("how, message", [
    ("nan", r"original1 holds NaN or inf values; nothing was loaded"),
    ("shape", r"original1 has shape \(9, 64\), but layer 'model\.layers\.1\.mlp\.down_proj' holds \(8, 64\) \(sltrain, A\)"),
    ("missing", r"lacks the sltrain factors \['model\.layers\.1\.mlp\.down_proj\.parametrizations\.weight\.original1'\]"),
])
def test_a_bad_factor_in_the_last_layer_is_refused_before_anything_is_copied(how, message):
    model, convert = parametrized_llama()
    convert(model)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    state, _ = corrupt(good, how)
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(state)
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())


def test_a_layer_left_out_loads_with_strict_false_but_a_partial_or_bad_one_never_does():
    model, convert = parametrized_llama()
    convert(model)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    layer = "model.layers.1.mlp.down_proj.parametrizations.weight."
    without_layer = {k: v for k, v in good.items() if not k.startswith(layer + "original")}
    result = model.load_state_dict(without_layer, strict=False)
    assert sorted(result.missing_keys) == sorted(k for k in good if k.startswith(layer + "original"))
    for how in ("missing", "nan"):
        state, _ = corrupt(good, how)
        with pytest.raises(ValueError, match="lacks the sltrain factors" if how == "missing" else "NaN"):
            model.load_state_dict(state, strict=False)


def test_a_dense_state_dict_into_a_parametrized_model_says_what_to_do():
    dense, convert = parametrized_llama()
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    model, _ = parametrized_llama(seed=1)
    convert(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"holds a dense weight model\.layers\.0\.self_attn\.q_proj\.weight .* load it "
                                         r"into the model before lsparam\.parametrize \(init='dense'"):
        model.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("value", ["no", 0, None])
def test_per_layer_must_be_a_bool(value):
    with pytest.raises(TypeError, match=f"per_layer must be True or False; got per_layer={value!r}"):
        LeanOptimizer(torch.nn.Linear(4, 4), torch.optim.AdamW, per_layer=value)


def test_factors_without_their_layer_buffers_are_refused():
    # the parameters alone (named_parameters()) would put another model's factors on this model's kept
    # channels, under a config never compared
    source = lsparam.parametrize(parametrized_llama(seed=0)[0], lsparam.LOSTConfig(rank=8, channel_ratio=0.25))
    model = lsparam.parametrize(parametrized_llama(seed=1)[0], lsparam.LOSTConfig(rank=8, channel_ratio=0.25, gamma=0.9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = {k: v.detach().clone() for k, v in source.named_parameters()}
    with pytest.raises(ValueError, match=r"has the lost factors of layer 'model\.layers\.0\.self_attn\.q_proj' but not "
                                         r"\['model\.layers\.0\.self_attn\.q_proj\.parametrizations\.weight\.0\.lsparam_spec', "
                                         r"'model\.layers\.0\.self_attn\.q_proj\.parametrizations\.weight\.0\.channels'\]"):
        model.load_state_dict(parameters, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("how", ["nan", "dense"])
def test_a_load_through_a_submodule_is_checked_too(how):
    model, convert = parametrized_llama()
    dense_layers = {k: v.clone() for k, v in model.model.layers.state_dict().items()}
    convert(model)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    if how == "nan":
        state, _ = corrupt(good, "nan")
        state = {k.removeprefix("model.layers."): v for k, v in state.items() if k.startswith("model.layers.")}
        message = "NaN or inf"
    else:
        state, message = dense_layers, r"holds a dense weight 0\.self_attn\.q_proj\.weight"
    with pytest.raises(ValueError, match=message):
        model.model.layers.load_state_dict(state, strict=False)
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())
    layer = model.model.layers[1].mlp.down_proj  # and through the layer itself
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.load_state_dict({k: v.clone().fill_(float("nan")) if "original" in k else v
                               for k, v in layer.state_dict().items()})


def test_a_load_through_a_wrapper_module_is_checked():
    # DDP, Lightning modules and user wrappers load through a module above the parametrized model
    model, convert = parametrized_llama()
    convert(model)
    wrapper = torch.nn.ModuleDict({"inner": model})
    good = {k: v.clone() for k, v in wrapper.state_dict().items()}
    state, _ = corrupt({k.removeprefix("inner."): v for k, v in good.items()}, "nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        wrapper.load_state_dict({f"inner.{k}": v for k, v in state.items()})
    assert all(torch.equal(v, good[k]) for k, v in wrapper.state_dict().items())
    wrapper.load_state_dict(good)  # and a good one loads
