"""lsparam on a real (tiny) transformers LLaMA: nn.Linear compatibility, dtypes, checkpoints, merge,
training and torch.compile, each checked against references written here, independently of lsparam."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

import lsparam

RANK = 8
CONFIGS = {
    "lowrank": lsparam.LowRankConfig(rank=RANK),
    "sltrain": lsparam.SLTrainConfig(rank=RANK, density=0.05),  # sparse_backend="auto"
    "sltrain-gather": lsparam.SLTrainConfig(rank=RANK, density=0.05, sparse_backend="gather"),
    "sltrain-csr": lsparam.SLTrainConfig(rank=RANK, density=0.05, sparse_backend="csr"),
    "sltrain-scatter": lsparam.SLTrainConfig(rank=RANK, density=0.05, sparse_backend="scatter"),
    "lost": lsparam.LOSTConfig(rank=RANK, channel_ratio=0.1),
    "lost-silu": lsparam.LOSTConfig(rank=RANK, channel_ratio=0.1, activation="silu"),
}
MERGEABLE = ["lowrank", "sltrain", "sltrain-csr", "sltrain-scatter", "lost"]
# One config per method (plus SLTrain's data-chosen support) for the checkpoint tests.
CHECKPOINT_CONFIGS = {
    "lowrank": CONFIGS["lowrank"],
    "sltrain": CONFIGS["sltrain"],
    "sltrain-dense-init": lsparam.SLTrainConfig(rank=RANK, density=0.05, init="dense"),
    "lost": CONFIGS["lost"],
    "lost-silu": CONFIGS["lost-silu"],
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DENSE_PARAMETERS = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
    f"model.layers.{i}.{norm}.weight" for i in range(2) for norm in ("input_layernorm", "post_attention_layernorm")
}
FACTOR = "parametrizations.weight.original"

# A fixed batch: 4 rows of a period-8 pattern, each shifted, so next-token loss can go far down.
PATTERN = torch.arange(32) % 8 + 3
BATCH = torch.stack([torch.roll(PATTERN, i) for i in range(4)])
IDS = torch.tensor([[5, 17, 99, 3, 64, 127, 0, 42, 8, 8, 31, 77]])


# ---- independent references ----------------------------------------------------------------------


def factors_of(layer):
    plist = layer.parametrizations.weight
    found, i = [], 0
    while hasattr(plist, f"original{i}"):
        found.append(getattr(plist, f"original{i}"))
        i += 1
    return found


def support_rows_cols(support):
    crow = support.crow_indices.to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow[1:] - crow[:-1])
    return rows, support.col_indices.to(torch.int64)


def reference_weight(layer):
    """The dense matrix by each paper's formula, from the factors and the fixed index sets."""
    p = layer.parametrizations.weight[0]
    config, f = p.config, factors_of(layer)
    if isinstance(config, lsparam.LowRankConfig):
        B, A = f
        return B @ A
    if isinstance(config, lsparam.SLTrainConfig):
        B, A, values = f
        rows, cols = support_rows_cols(p.support)
        sparse = torch.zeros(layer.out_features, layer.in_features, dtype=values.dtype)
        sparse[rows, cols] = values
        return (config.alpha / config.rank) * (B @ A) + sparse
    assert isinstance(config, lsparam.LOSTConfig) and config.activation is None
    B, A, block = f
    weight = config.gamma * (B @ A)
    weight[:, p.channels] += (1 - config.gamma) * block
    return weight


def reference_linear(layer, x):
    """The layer's output by the paper's formula (the only reference SiLU-LOST has)."""
    p = layer.parametrizations.weight[0]
    config = p.config
    if isinstance(config, lsparam.LOSTConfig) and config.activation == "silu":
        B, A, block = factors_of(layer)
        y = config.gamma * (F.silu(x @ A.T) @ B.T) + (1 - config.gamma) * (x[..., p.channels] @ block.T)
    else:
        y = x @ reference_weight(layer).T
    return y if layer.bias is None else y + layer.bias


def with_reference_forward(model):
    """A deep copy whose structured layers output ``reference_linear`` (their own forward is overridden)."""
    model = copy.deepcopy(model)
    for layer, _ in lsparam.structured_layers(model).values():
        layer.register_forward_hook(lambda module, args, out: reference_linear(module, args[0]))
    return model


def perturb(model, seed=1, scale=0.05):
    """Move every factor off its initial value (SLTrain starts with B = 0, which would hide the low-rank part)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if FACTOR in name:
                param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def structured(llama_factory, name, seed=0):
    return perturb(lsparam.parametrize(llama_factory(seed), CONFIGS[name]))


def projection_layers(model):
    return {n: m for n, m in model.named_modules() if n.endswith(PROJECTIONS)}


# ---- nn.Linear compatibility ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parametrized_layers_still_look_like_nn_linear(llama_factory, name):
    model = structured(llama_factory, name)
    reference = llama_factory(0)
    layers = projection_layers(model)
    assert len(layers) == 14
    for layer_name, layer in layers.items():
        dense = reference.get_submodule(layer_name)
        assert isinstance(layer, nn.Linear) and torch_parametrize.is_parametrized(layer, "weight")
        assert (layer.in_features, layer.out_features) == (dense.in_features, dense.out_features)
        weight = layer.weight
        assert isinstance(weight, lsparam.StructuredWeight)
        assert weight.shape == (dense.out_features, dense.in_features) == dense.weight.shape
        assert weight.dtype == torch.float32 and weight.device.type == "cpu"
        x = torch.randn(3, 5, layer.in_features)
        torch.testing.assert_close(layer(x), reference_linear(layer, x), atol=1e-5, rtol=1e-5)
        if name == "lost-silu":
            continue  # no dense form: see test_bad_input
        materialised = weight + 0
        assert type(materialised) is torch.Tensor
        torch.testing.assert_close(materialised, reference_weight(layer), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer(x), F.linear(x, reference_weight(layer)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float64_model_matches_a_float64_dense_reference(llama_factory, name):
    model = structured(llama_factory, name).to(torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert all(layer.weight.dtype == torch.float64 for layer in projection_layers(model).values())
    out = logits(model)
    assert out.dtype == torch.float64
    # Reference 1: the paper formulas, in float64, on a copy.
    torch.testing.assert_close(out, logits(with_reference_forward(model)), atol=1e-10, rtol=1e-10)
    # Reference 2: a merged (plain dense float64) copy.
    if name in MERGEABLE:
        merged = lsparam.merge(copy.deepcopy(model))
        assert all(type(m) is nn.Linear for m in projection_layers(merged).values())
        assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float64
        torch.testing.assert_close(out, logits(merged), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bfloat16_logits_and_gradients_match_the_formula(llama_factory, name):
    model = structured(llama_factory, name)
    fp32 = model(IDS).logits.detach()
    model.to(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    if name == "sltrain-csr":
        # No CPU CSR kernel for bf16: an explicit csr choice refuses, naming the dtype ("auto" falls back).
        with pytest.raises(ValueError, match=r"sparse_backend='csr'.*torch\.bfloat16"):
            model(IDS, labels=IDS)
        return
    # the same (bf16-rounded) weights, each layer by its paper's formula in float64 (not lsparam's code)
    reference = with_reference_forward(model).to(torch.float64)
    out = model(IDS, labels=IDS)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    reference(IDS, labels=IDS).loss.backward()
    for (param_name, param), (_, exact) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert param.grad is not None and param.grad.dtype == torch.bfloat16, param_name
        # bf16's rounding of the activations leaves 1-3% here (2 layers, 12 tokens); a wrong gradient ~100%
        error = ((param.grad.double() - exact.grad).norm() / exact.grad.norm()).item()
        assert error < 0.06, f"{param_name}: gradient {error:.3f} from float64"
    scale = fp32.abs().max()
    assert (out.logits.float() - fp32).abs().max() < 0.05 * scale


# ---- checkpoints ------------------------------------------------------------------------------------


def checkpoint_source(llama_factory, config):
    model = perturb(lsparam.parametrize(llama_factory(0), config))
    # One optimizer step so that every tensor (dense ones included) differs from a fresh model's.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(BATCH, labels=BATCH).loss.backward()
    optimizer.step()
    return model


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", list(CHECKPOINT_CONFIGS))
@pytest.mark.parametrize("via", ["state_dict", "safetensors"])
def test_state_dict_round_trip_is_exact(llama_factory, tmp_path, name, via):
    config = CHECKPOINT_CONFIGS[name]
    source = checkpoint_source(llama_factory, config)
    state = source.state_dict()
    assert not any(key.endswith("_proj.weight") for key in state)
    if via == "safetensors":
        from safetensors.torch import load_file, save_file

        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        state = load_file(str(path))
    target = lsparam.parametrize(llama_factory(1), config)  # other init: everything must come from the file
    assert not torch.equal(logits(target), logits(source))
    result = target.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_state(source, target)
    assert torch.equal(logits(target), logits(source))
    # The fixed index sets (supports, channels) are the source's, not the fresh model's.
    for (layer_name, (_, p)), (_, (_, q)) in zip(
        lsparam.structured_layers(source).items(), lsparam.structured_layers(target).items()
    ):
        for buffer_name, buffer in p.named_buffers():
            assert torch.equal(buffer, dict(q.named_buffers())[buffer_name]), f"{layer_name}.{buffer_name}"


def test_sltrain_state_dict_holds_no_index_tensor(llama):
    config = CONFIGS["sltrain"]
    state = lsparam.parametrize(llama, config).state_dict()
    structured_keys = {k: v for k, v in state.items() if ".parametrizations." in k}
    assert len(structured_keys) == 14 * 4  # B, A, values and the uint8 config fingerprint per layer
    for key, value in structured_keys.items():
        if key.endswith("lsparam_spec"):
            assert value.dtype == torch.uint8, key
        else:
            assert re.search(r"original[012]$", key) and value.dtype == torch.float32, key
    assert not any(v.dtype in (torch.int64, torch.int32, torch.uint16) for v in state.values())
    # Values per layer: exactly nnz floats, no more (indices are regenerated, not stored).
    q = "model.layers.0.self_attn.q_proj.parametrizations.weight.original2"
    assert state[q].shape == (math.floor(0.05 * 64 * 64),)


def test_sltrain_dense_init_stores_its_support_as_held(llama):
    state = lsparam.parametrize(llama, CHECKPOINT_CONFIGS["sltrain-dense-init"]).state_dict()
    index_keys = [k for k in state if k.endswith(("crow_indices", "col_indices"))]
    assert len(index_keys) == 14 * 2
    assert all(state[k].dtype == (torch.uint16 if k.endswith("col_indices") else torch.int32) for k in index_keys)
    assert not any(v.dtype == torch.int64 for v in state.values())


def test_sltrain_support_is_regenerated_identically(llama_factory):
    config = CONFIGS["sltrain"]
    source = lsparam.parametrize(llama_factory(0), config)
    fresh = lsparam.parametrize(llama_factory(7), config)  # other weights, same config and names
    supports = {}
    for (name, (_, p)), (_, (_, q)) in zip(
        lsparam.structured_layers(source).items(), lsparam.structured_layers(fresh).items()
    ):
        assert torch.equal(p.support.crow_indices, q.support.crow_indices), name
        assert torch.equal(p.support.col_indices, q.support.col_indices), name
        assert p.support.col_indices.dtype == torch.uint16  # every column of a d=64 layer fits 16 bits
        supports[name] = p.support.col_indices
    fresh.load_state_dict(source.state_dict())
    for name, (_, q) in lsparam.structured_layers(fresh).items():
        assert torch.equal(q.support.col_indices, supports[name])
    # The support depends on the layer (two layers of one shape differ) and on the seed.
    assert not torch.equal(supports["model.layers.0.self_attn.q_proj"], supports["model.layers.0.self_attn.k_proj"])
    other_seed = lsparam.parametrize(llama_factory(0), lsparam.SLTrainConfig(rank=RANK, density=0.05, seed=1))
    other = other_seed.model.layers[0].self_attn.q_proj.parametrizations.weight[0].support.col_indices
    assert not torch.equal(other, supports["model.layers.0.self_attn.q_proj"])


def test_state_dict_into_a_model_parametrized_from_another_root_is_refused_or_exact(llama_factory):
    config = CONFIGS["sltrain"]
    source = perturb(lsparam.parametrize(llama_factory(0), config))
    target = llama_factory(1)
    lsparam.parametrize(target.model, config)  # same modules, names now relative to target.model
    assert list(target.state_dict()) == list(source.state_dict())
    try:
        target.load_state_dict(source.state_dict())
    except ValueError:
        return  # refusing is an acceptable answer
    assert torch.equal(logits(target), logits(source))


def test_sltrain_support_is_fixed_during_training(llama):
    config = lsparam.SLTrainConfig(rank=RANK, density=0.05)
    lsparam.parametrize(llama, config)
    layers = lsparam.structured_layers(llama)
    before = {n: (p.support.crow_indices.clone(), p.support.col_indices.clone()) for n, (_, p) in layers.items()}
    values_before = {n: factors_of(layer)[2].detach().clone() for n, (layer, _) in layers.items()}
    optimizer = torch.optim.AdamW(llama.parameters(), lr=3e-3)
    for _ in range(3):
        optimizer.zero_grad()
        llama(BATCH, labels=BATCH).loss.backward()
        optimizer.step()
    for name, (layer, p) in layers.items():
        out_features, in_features = layer.out_features, layer.in_features
        nnz = math.floor(0.05 * out_features * in_features)
        assert p.support.nnz == nnz == p.support.col_indices.numel() == factors_of(layer)[2].numel()
        crow, col = before[name]
        assert torch.equal(p.support.crow_indices, crow) and torch.equal(p.support.col_indices, col), name
        # A valid CSR support: row pointers from 0 to nnz, columns in range and increasing within a row.
        assert crow[0] == 0 and crow[-1] == nnz and (crow[1:] >= crow[:-1]).all()
        assert int(col.int().min()) >= 0 and int(col.int().max()) < in_features  # uint16 has no min/max kernel
        rows, cols = support_rows_cols(p.support)
        flat = rows * in_features + cols
        assert (flat[1:] > flat[:-1]).all()
        # The values did train (so the support really stayed put under updates).
        assert not torch.equal(factors_of(layer)[2], values_before[name])


# ---- merge --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lowrank", "sltrain", "lost"])
def test_merge_gives_a_vanilla_llama(llama_factory, name):
    model = structured(llama_factory, name)
    before = logits(model)
    expected_weights = {n: reference_weight(m).detach().clone() for n, m in projection_layers(model).items()}
    merged = lsparam.merge(model)
    assert merged is model
    assert lsparam.structured_layers(model) == {}
    for layer_name, layer in projection_layers(model).items():
        assert type(layer) is nn.Linear, layer_name
        assert type(layer.weight) is nn.Parameter and layer.weight.requires_grad
        torch.testing.assert_close(layer.weight.detach(), expected_weights[layer_name], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)

    state = model.state_dict()
    vanilla = llama_factory(3)  # a fresh dense model with other weights
    assert set(state) == set(vanilla.state_dict())
    assert all(v.dtype == torch.float32 for v in state.values())
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM(vanilla.config).eval()
    reloaded.load_state_dict(state)
    assert torch.equal(logits(reloaded), logits(model))


@pytest.mark.parametrize("order", ["merge the copy", "merge the original"])
def test_merging_a_deep_copy_leaves_the_other_model_training(llama_factory, order):
    # deepcopy shares a parametrized module's class with its copy, and removing a parametrization deletes
    # the weight's property from that class: merging one of the two must not take `weight` from the other
    model = structured(llama_factory, "sltrain")
    before = logits(model)
    copied = copy.deepcopy(model)
    merged, kept = (copied, model) if order == "merge the copy" else (model, copied)
    lsparam.merge(merged)
    assert all(type(layer) is nn.Linear for layer in projection_layers(merged).values())
    assert len(lsparam.structured_layers(kept)) == len(projection_layers(kept))
    for layer in projection_layers(kept).values():
        torch.testing.assert_close(layer.weight.dense(), reference_weight(layer), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(kept), before, atol=0, rtol=0)
    torch.testing.assert_close(logits(merged), before, atol=1e-5, rtol=1e-5)
    kept(input_ids=BATCH, labels=BATCH).loss.backward()
    assert all(factor.grad is not None for layer in projection_layers(kept).values() for factor in factors_of(layer))
    lsparam.merge(kept)  # and the other one still merges
    torch.testing.assert_close(logits(kept), before, atol=1e-5, rtol=1e-5)


# ---- training -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lowrank", "sltrain", "lost", "lost-silu"])
def test_tiny_llama_trains(llama_factory, name):
    model = lsparam.parametrize(llama_factory(0), CONFIGS[name]).train()
    names = [n for n, _ in model.named_parameters()]
    factor_names = [n for n in names if FACTOR in n]
    assert not any(n.endswith("_proj.weight") for n in names)  # no dense projection weight is left
    assert set(names) - set(factor_names) == DENSE_PARAMETERS
    assert len(factor_names) == 14 * (2 if name == "lowrank" else 3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(30):
        optimizer.zero_grad(set_to_none=True)
        loss = model(BATCH, labels=BATCH).loss
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad == set(names)  # every factor and every dense parameter, nothing else
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), start[n]), f"{n} never moved"


@pytest.mark.parametrize("name", ["sltrain", "lost-silu"])
def test_factors_alone_can_lower_the_loss(llama_factory, name):
    """Dense parameters frozen: only gradients through the structured forward can lower the loss."""
    model = lsparam.parametrize(llama_factory(0), CONFIGS[name]).train()
    for n, p in model.named_parameters():
        p.requires_grad_(FACTOR in n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        loss = model(BATCH, labels=BATCH).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


# ---- torch.compile ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sltrain", "lost-silu"])
def test_torch_compile_matches_eager(llama_factory, name):
    torch._dynamo.reset()
    model = structured(llama_factory, name)
    eager = model(BATCH, labels=BATCH)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    try:
        compiled = torch.compile(model)
        out = compiled(BATCH, labels=BATCH)
        out.loss.backward()
        from torch._dynamo.utils import counters

        assert counters["stats"]["unique_graphs"] > 0  # something was really compiled
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out.logits, eager.logits, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, eager_grads[n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


# ---- summary --------------------------------------------------------------------------------------------


def parse_count(text):
    return int(text.replace(",", ""))


@pytest.mark.parametrize("name", ["lowrank", "sltrain", "lost"])
def test_summary_counts_match_the_parameters(llama_factory, name):
    config = CONFIGS[name]
    model = lsparam.parametrize(llama_factory(0), config, exclude_modules=["layers.1.mlp.down_proj"])
    lines = lsparam.summary(model).splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    assert header == ["layer", "method", "shape", "params before", "params after", "nnz", "init error"]
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[1:-2]]
    original = llama_factory(0)  # the same seed: the dense weights each layer replaced
    params = dict(model.named_parameters())
    structured_names = [n for n in projection_layers(model) if n != "model.layers.1.mlp.down_proj"]
    assert [row[0] for row in rows] == structured_names
    totals = [0, 0, 0]
    for layer_name, method, shape, before, after, nnz, init_error in rows:
        layer = model.get_submodule(layer_name)
        w0 = original.get_submodule(layer_name).weight.detach().double()
        relative = torch.linalg.matrix_norm(layer.weight.dense().detach().double() - w0) / torch.linalg.matrix_norm(w0)
        assert init_error == f"{100 * relative.item():.1f}%"
        assert method == {"lowrank": "lowrank", "sltrain": "sltrain", "lost": "lost"}[name]
        assert shape == f"{layer.out_features}x{layer.in_features}"
        own = sum(p.numel() for n, p in params.items() if n.startswith(f"{layer_name}.{FACTOR}"))
        assert parse_count(before) == layer.out_features * layer.in_features
        assert parse_count(after) == own
        if name == "lowrank":
            expected_nnz = 0
            assert own == RANK * (layer.in_features + layer.out_features)
        elif name == "sltrain":
            expected_nnz = math.floor(0.05 * layer.out_features * layer.in_features)
            assert own == RANK * (layer.in_features + layer.out_features) + expected_nnz
        else:
            expected_nnz = max(1, math.floor(0.1 * layer.in_features)) * layer.out_features
            assert own == RANK * (layer.in_features + layer.out_features) + expected_nnz
        assert parse_count(nnz) == expected_nnz
        totals = [t + parse_count(v) for t, v in zip(totals, (before, after, nnz))]
    total = re.split(r"\s{2,}", lines[-2].strip())
    assert total[0] == "total" and [parse_count(v) for v in total[1:4]] == totals
    match = re.fullmatch(r"model parameters: ([\d,]+) \(was ([\d,]+) dense; ([\d.]+)%\)", lines[-1])
    assert match, lines[-1]
    now, was, share = parse_count(match[1]), parse_count(match[2]), float(match[3])
    assert now == sum(p.numel() for p in model.parameters())
    assert was == sum(p.numel() for p in llama_factory(0).parameters())
    assert share == pytest.approx(100 * now / was, abs=0.05)


def test_linear_with_keyword_arguments_uses_the_factorised_forward():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    lsparam.parametrize(layer, lsparam.LOSTConfig(rank=4), target_modules=None)
    x = torch.randn(3, 16)
    expected = x @ layer.weight.dense().T + layer.bias
    torch.testing.assert_close(torch.nn.functional.linear(input=x, weight=layer.weight, bias=layer.bias), expected)


def test_parametrize_without_a_config_is_lost_silu_at_the_studied_sizes(llama_factory):
    """The default (docs/methods.md#defaults): each layer computes γ·SiLU(x Aᵀ) Bᵀ + (1 − γ)·x[..., I] W_sᵀ
    with r = min(in, out) / 4, m = floor(0.05 · in) channels and γ = 0.5, checked by hand in float64."""
    model = lsparam.parametrize(llama_factory(0))
    for name in projection_layers(model):
        layer = model.get_submodule(name)
        B, A, sparse = (f.detach().double() for f in factors_of(layer))
        channels = layer.parametrizations.weight[0].channels
        assert A.shape[0] == min(layer.in_features, layer.out_features) // 4
        assert channels.numel() == max(1, math.floor(0.05 * layer.in_features))
        x = torch.randn(3, 5, layer.in_features, dtype=torch.float64)
        expected = 0.5 * F.silu(x @ A.T) @ B.T + 0.5 * x[..., channels] @ sparse.T
        torch.testing.assert_close(layer.double()(x), expected)
