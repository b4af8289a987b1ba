"""The memory ledger: counts against real models, bytes against the formulas, the CLI."""

import contextlib
import dataclasses
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lsparam
from lsparam.cli import main
from lsparam.lean_head import use_lean_head
from lsparam.memory import estimate, measure
from lsparam.memory.peak import _storage_bytes
from lsparam.presets import METHODS, llama_config, method_config
from lsparam.sparse import native
from lsparam.sparse.support import SparseSupport

TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64, "tie_word_embeddings": False}
CONFIGS = {
    "full": None,
    "lowrank": lsparam.LowRankConfig(rank=16),
    "sltrain": lsparam.SLTrainConfig(rank=16, density=0.05),
    "lost": lsparam.LOSTConfig(rank=16),
    "lost-silu": lsparam.LOSTConfig(rank=16, activation="silu"),
}


def real_model(method_config):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    if method_config is not None:
        lsparam.parametrize(model, method_config)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_estimated_parameter_count_equals_a_real_models_numel(name):
    predicted = estimate(LlamaConfig(**TINY), CONFIGS[name], param_dtype="fp32")
    model = real_model(CONFIGS[name])
    assert predicted.parameter_count == sum(p.numel() for p in model.parameters())
    assert predicted.parameters == 4 * predicted.parameter_count


def test_llama_7b_counts_from_the_config_alone():
    d, f, layers, vocab = 4096, 11008, 32, 32000
    dense = 2 * vocab * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d
    full = estimate("llama_7b", "full")
    assert full.parameter_count == dense  # 6.74B, LLaMA-7B's published size
    assert full.parameters == 2 * dense and full.optimizer_states == 2 * 2 * dense  # bf16 weights and states
    r, nnz = 1024, lambda o, i: math.floor(0.05 * o * i)
    linear = layers * (4 * (r * 2 * d + nnz(d, d)) + 2 * (r * (d + f) + nnz(f, d)) + r * (d + f) + nnz(d, f))
    sltrain = estimate("llama_7b", "sltrain")
    assert sltrain.parameter_count == dense - layers * (4 * d * d + 3 * d * f) + linear


def test_state_bytes_follow_torchao_rules():
    full = estimate(LlamaConfig(**TINY), None, param_dtype="fp32")
    eight = estimate(LlamaConfig(**TINY), None, param_dtype="fp32", state_bits=8)
    model = real_model(None)
    expected = 0
    for p in model.parameters():
        n = p.numel()
        if n < 4096:
            expected += 2 * 4 * n
        else:
            padded = math.ceil(n / 256) * 256
            expected += 2 * (padded + padded // 256 * 4 + 256 * 4)  # codes, a scale per block, the code table
    assert eight.optimizer_states == expected
    assert full.optimizer_states == 2 * 4 * sum(p.numel() for p in model.parameters())


def held_state_bytes(optimizer) -> int:
    """Bytes of every tensor an optimizer's states hold (torchao's low-bit states: their component tensors)."""
    total = 0
    for inner in optimizer._inner:
        for state in inner.state.values():
            for key, value in state.items():
                if key == "step":  # a scalar, not counted by the ledger
                    continue
                parts = value.__tensor_flatten__()[0] if hasattr(value, "__tensor_flatten__") else []
                tensors = [getattr(value, name) for name in parts] or [value]
                total += sum(t.numel() * t.element_size() for t in tensors)
    return total


@pytest.mark.parametrize("name", ["full", "sltrain", "lost"])
@pytest.mark.parametrize("bits", [32, 8, 4])
def test_state_bytes_equal_what_the_optimizer_holds_after_a_step(name, bits):
    from lsparam.optim import LeanOptimizer

    model = real_model(CONFIGS[name])
    optimizer = LeanOptimizer(model, torch.optim.AdamW, lr=1e-3, state_bits=bits)
    ids = torch.randint(0, TINY["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert held_state_bytes(optimizer) == estimate(model, param_dtype="fp32", state_bits=bits).optimizer_states


def test_per_layer_keeps_only_the_largest_gradient():
    model = real_model(CONFIGS["sltrain"])
    whole = estimate(model, param_dtype="fp32")
    per_layer = estimate(model, param_dtype="fp32", per_layer=True)
    assert whole.gradients == 4 * sum(p.numel() for p in model.parameters())
    assert per_layer.gradients == 4 * max(p.numel() for p in model.parameters())


TRACED = {
    **{name: CONFIGS[name] for name in ("full", "lowrank", "sltrain", "lost", "lost-silu")},
    "sltrain-scatter": lsparam.SLTrainConfig(rank=16, density=0.05, sparse_backend="scatter"),
    "cola": lsparam.CoLAConfig(rank=16),
    "cola-checkpointed": lsparam.CoLAConfig(rank=16, checkpoint=True),
}


def saved_activation_bytes(model, ids, native_kernels: bool = True) -> int:
    """A real fp32 step on CPU, counted here: the distinct storages autograd saves, less the parameters,
    buffers and sparse supports (resident anyway, counted under their own headings)."""
    saved = {}  # data_ptr -> (bytes, the storage itself: held, so no later tensor reuses its address)

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = (storage.nbytes(), storage)
        return t

    with contextlib.ExitStack() as stack:
        if not native_kernels:
            stack.enter_context(native.disabled())
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # the saved tensors are those a step's backward reads
        resident = [*model.parameters(), *model.buffers()]
        for module in model.modules():
            if isinstance(module, SparseSupport):
                resident += module.index_tensors()  # the CSR arrays and the transposed copy, once built
    resident_ptrs = {t.untyped_storage().data_ptr() for t in resident}
    assert len(saved) > len(saved.keys() & resident_ptrs) > 0  # the step saves both kinds
    return sum(nbytes for ptr, (nbytes, _) in saved.items() if ptr not in resident_ptrs)


@pytest.mark.parametrize(
    "name, native_kernels",
    [*((name, True) for name in TRACED), ("sltrain", False)],  # False: SLTrain's embedding_bag route
    ids=[*TRACED, "sltrain-embedding_bag"],
)
def test_activations_are_the_bytes_a_real_step_saves_beyond_what_the_model_holds(name, native_kernels):
    ids = torch.randint(0, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    activations = saved_activation_bytes(real_model(TRACED[name]), ids, native_kernels)
    predicted = estimate(LlamaConfig(**TINY), TRACED[name], param_dtype="fp32", batch_size=2, seq_len=32)
    assert predicted.activations == pytest.approx(activations, rel=1e-3)


@pytest.mark.parametrize("name", ["full", "sltrain", "cola"])
def test_with_the_lean_head_the_ledger_counts_what_its_step_saves(name):
    """The chunked head saves the gradients of the hidden states and of the head's weight instead of the
    logits; the ledger traces it when told, and the plain head's logits are then gone from the count."""
    ids = torch.randint(0, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    activations = saved_activation_bytes(use_lean_head(real_model(TRACED[name]), chunk_tokens=16), ids)
    # and the head's two gradients, made in the forward and held by its node until backward
    activations += (2 * 31 + TINY["vocab_size"]) * TINY["hidden_size"] * 4
    config = LlamaConfig(**TINY)
    lean = estimate(config, TRACED[name], param_dtype="fp32", batch_size=2, seq_len=32, lean_head=True)
    plain = estimate(config, TRACED[name], param_dtype="fp32", batch_size=2, seq_len=32)
    assert lean.activations == pytest.approx(activations, rel=1e-3)
    logits = 2 * 32 * TINY["vocab_size"] * 4
    # the plain head saves the fp32 logits (and what the loss keeps of them); the lean one never has them
    assert plain.activations - lean.activations >= logits - TINY["vocab_size"] * TINY["hidden_size"] * 4
    # past one chunk of tokens the lean head's largest temporary is a chunk's logits, not all of them
    lean, plain = (estimate("llama_60m", name, batch_size=32, lean_head=on) for on in (True, False))
    assert lean.transient < plain.transient / 2


def test_on_cuda_sltrain_is_traced_on_the_path_a_cuda_step_takes():
    """CUDA takes the CSR path, whose low-rank part saves what the scatter path's does: like the gather
    path, ``x`` and the r-wide hidden (the scale rides on the hidden, so no ``s·B`` copy is saved)."""
    auto, scatter = CONFIGS["sltrain"], TRACED["sltrain-scatter"]
    on_cuda = estimate(LlamaConfig(**TINY), auto, param_dtype="fp32", device="cuda")
    assert on_cuda.activations == estimate(LlamaConfig(**TINY), scatter, param_dtype="fp32").activations
    assert on_cuda.activations == estimate(LlamaConfig(**TINY), auto, param_dtype="fp32").activations
    assert on_cuda.sparse_indices > estimate(LlamaConfig(**TINY), auto, param_dtype="fp32").sparse_indices


def test_checkpointing_reduces_activations():
    plain = estimate("llama_130m", "lost", batch_size=4)
    checkpointed = estimate("llama_130m", "lost", batch_size=4, activation_checkpointing=True)
    assert checkpointed.activations < 0.5 * plain.activations


def test_paper_convention_is_weights_plus_states_plus_indices():
    e = estimate("llama_60m", "sltrain")
    assert e.paper == e.parameters + e.optimizer_states + e.sparse_indices
    assert e.sparse_indices > 0


def test_measure_counts_a_known_temporary():
    held = torch.ones(512, 512)  # 1 MiB alive before
    result = measure(lambda: (held * 2).sum(), device="cpu")
    assert result.baseline >= held.numel() * 4
    assert result.peak - result.baseline == pytest.approx(held.numel() * 4, rel=0.01)


def test_prediction_is_close_to_a_measured_step():
    config = LlamaConfig(**{**TINY, "vocab_size": 2000, "hidden_size": 128, "intermediate_size": 344})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    lsparam.parametrize(model, lsparam.SLTrainConfig(rank=32, density=0.03))
    optimizer = lsparam.optim.LeanOptimizer(model, torch.optim.AdamW, lr=1e-3)
    ids = torch.randint(0, 2000, (2, 64))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # states exist from here on, as in any later step
    measured = measure(step, device="cpu")
    predicted = estimate(model, param_dtype="fp32", batch_size=2, seq_len=64)
    # measure() counts every tensor alive in the process (other tests' leftovers too): compare the
    # step's own growth plus what this model and its optimizer hold
    states = [v for inner in optimizer._inner for s in inner.state.values() for v in s.values()]
    held = _storage_bytes([*model.parameters(), *model.buffers(), *(v for v in states if isinstance(v, torch.Tensor))])
    assert predicted.total == pytest.approx(measured.peak - measured.baseline + held, rel=0.15)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"state_bits": 7}, "state_bits must be 32, 8 or 4; got state_bits=7"),
        ({"param_dtype": "int8"}, "param_dtype must be one of"),
        ({"batch_size": 0}, "batch_size must be a positive int; got batch_size=0"),
        ({"optimizer": "lion"}, "optimizer must be one of"),
        ({"device": "mps"}, "device must be 'cpu' or 'cuda'; got device='mps'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate("llama_60m", "full", **kwargs)


def test_unknown_size_and_method():
    with pytest.raises(ValueError, match="unknown model size 'llama_3b'"):
        estimate("llama_3b")
    with pytest.raises(ValueError, match="method must be one of"):
        method_config("galore")


def test_a_model_with_a_method_is_refused_not_counted_as_another():
    """A model is counted as it is: a method beside it would describe some other model."""
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    with pytest.raises(ValueError, match="got method='lost' with a model"):
        estimate(model, "lost")
    assert not lsparam.structured_layers(model)  # nothing was parametrized


def test_cli_prints_every_method_and_marks_the_chosen_row(capsys):
    assert main(["memory", "--model", "llama_60m", "--method", "sltrain", "--state-bits", "8", "--per-layer"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    rows = lines[2:]
    assert [r.split()[0] for r in rows[::4]] == [*METHODS, "cola-m"]  # 32/8-bit states x per-layer each
    marked = [r for r in rows if r.endswith("<")]
    assert len(marked) == 1 and marked[0].split()[:3] == ["sltrain", "8", "yes"]
    full_paper = float(rows[0].split()[-2])
    assert full_paper == pytest.approx(estimate("llama_60m", "full").paper / 2**30, abs=0.006)


def test_cli_cola_m_row_is_cola_recomputing_its_activation(capsys):
    assert main(["memory", "--model", "llama_60m", "--batch-size", "4", "--json"]) == 0
    rows = {(r["method"], r["state_bits"], r["per_layer"]): r for r in json.loads(capsys.readouterr().out)}
    cola, cola_m = rows[("cola", 32, False)], rows[("cola-m", 32, False)]
    config = method_config("cola", "llama_60m")
    expected = estimate("llama_60m", dataclasses.replace(config, checkpoint=True), batch_size=4)
    assert cola_m["activations"] == expected.activations
    # the only difference: per decoder linear, one bf16 r-wide activation of the 4 x 256 tokens not saved
    linears = 7 * llama_config("llama_60m").num_hidden_layers
    assert cola["activations"] - cola_m["activations"] == linears * 4 * 256 * config.rank * 2
    assert cola_m["parameter_count"] == cola["parameter_count"]


def test_cli_lean_head_prints_the_ledger_of_the_chunked_head(capsys):
    assert main(["memory", "--model", "llama_60m", "--lean-head", "--batch-size", "32", "--json"]) == 0
    rows = {(r["method"], r["state_bits"], r["per_layer"]): r for r in json.loads(capsys.readouterr().out)}
    expected = estimate("llama_60m", "sltrain", batch_size=32, lean_head=True)
    assert rows[("sltrain", 32, False)]["total"] == expected.total
    assert expected.total < estimate("llama_60m", "sltrain", batch_size=32).total  # no full logits


def test_cli_help_explains_every_column(capsys):
    with pytest.raises(SystemExit):
        main(["memory", "--help"])
    text = capsys.readouterr().out
    for column in ("params(M)", "weights", "grads", "states", "indices", "activations", "paper", "peak"):
        assert column in text


@pytest.mark.parametrize("native_kernels", [True, False], ids=["native", "embedding_bag"])
def test_each_parametrization_reports_the_index_bytes_it_really_holds(native_kernels):
    """Counted from the tensors themselves after a forward and backward (the embedding_bag route builds its
    transposed support there, and keeps it), not from the formula the method uses."""
    torch.manual_seed(0)
    for config in (lsparam.SLTrainConfig(rank=4, density=0.05, sparse_backend="gather"),
                   lsparam.LOSTConfig(rank=4, channel_ratio=0.1), lsparam.LowRankConfig(rank=4)):
        layer = lsparam.parametrize(torch.nn.Linear(64, 48), config, target_modules=None)
        with contextlib.ExitStack() as stack:
            if not native_kernels:
                stack.enter_context(native.disabled())
            layer(torch.randn(3, 64, requires_grad=True)).sum().backward()  # dX too, as inside a model
            p = layer.parametrizations.weight[0]
            held = [b for name, b in p.named_buffers() if name != "lsparam_spec"]
            if hasattr(p, "support"):
                held += p.support.index_tensors()
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
            assert p.index_bytes("cpu", torch.float32) == sum(storages.values()), type(config).__name__


def test_every_built_in_factor_has_a_role():
    layer = lsparam.parametrize(torch.nn.Linear(16, 16), lsparam.SLTrainConfig(rank=2, density=0.1), target_modules=None)
    p = layer.parametrizations.weight[0]
    assert dict(zip(p.factor_names, p.roles())) == {"B": "lowrank_out", "A": "lowrank_in", "values": "sparse"}
    shapes = {role: tuple(getattr(layer.parametrizations.weight, f"original{i}").shape) for i, role in enumerate(p.roles())}
    assert shapes == {"lowrank_out": (16, 2), "lowrank_in": (2, 16), "sparse": (25,)}


@pytest.mark.parametrize("layout", ["q_proj only", "mixed"])
def test_a_partly_or_mixed_parametrized_model_is_counted_as_it_is(layout):
    # activations of the model's own layout, not of its first layer's config applied to every layer
    model = real_model(None)
    if layout == "q_proj only":
        lsparam.parametrize(model, lsparam.CoLAConfig(rank=16), target_modules=["q_proj"])
    else:
        lsparam.parametrize(model, {r"\.mlp\.": lsparam.CoLAConfig(rank=16), r"\.self_attn\.": lsparam.LowRankConfig(rank=16)})
    ids = torch.zeros(1, 64, dtype=torch.long)
    predicted = estimate(model, param_dtype="fp32", batch_size=1, seq_len=64)
    assert predicted.activations == saved_activation_bytes(model, ids)
    assert predicted.notes == []


def test_decoder_layers_parametrized_differently_are_noted():
    model = lsparam.parametrize(real_model(None), {r"layers\.0\.": lsparam.CoLAConfig(rank=16),
                                                   r"layers\.1\.": lsparam.LowRankConfig(rank=16)})
    assert estimate(model, param_dtype="fp32").notes == [
        "decoder layers are parametrized differently: activations traced as layer 0's"]
