"""torch.compile of parametrized models: no graph break, no warning, the same logits and gradients as eager.

Dynamo builds each ``StructuredWeight`` inside the compiled region and inlines its ``__torch_function__``
(see lsparam/weight.py), so a whole parametrized LLaMA is one graph. ``fullgraph=True`` turns any graph
break into an error that names its reason. Each method compiles with the ``aot_eager`` backend (Dynamo and
AOTAutograd's joint forward/backward graph: what decides breaks and gradients, in seconds); one
configuration runs through Inductor as well (slow on CPU: it compiles C++).
"""

import contextlib
import logging
import warnings

import pytest
import torch
from torch import nn

import lsparam
from lsparam.lean_head import use_lean_head
from lsparam.sparse import csr_ops, native
from lsparam.sparse.support import SparseSupport, uniform_flat_indices
from tests.conftest import tiny_llama

RANK = 8
CONFIGS = {
    "lowrank": lsparam.LowRankConfig(rank=RANK),
    "sltrain-gather": lsparam.SLTrainConfig(rank=RANK, density=0.05, sparse_backend="gather"),
    "sltrain-embedding-bag": lsparam.SLTrainConfig(rank=RANK, density=0.05, sparse_backend="gather"),
    "sltrain-scatter": lsparam.SLTrainConfig(rank=RANK, density=0.05, sparse_backend="scatter"),
    "sltrain-csr": lsparam.SLTrainConfig(rank=RANK, density=0.05, sparse_backend="csr"),
    "lost": lsparam.LOSTConfig(rank=RANK, channel_ratio=0.1),
    "lost-silu": lsparam.LOSTConfig(rank=RANK, channel_ratio=0.1, activation="silu"),
    "cola": lsparam.CoLAConfig(rank=RANK),
    "cola-checkpoint": lsparam.CoLAConfig(rank=RANK, checkpoint=True),
}
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # float32; compiled kernels may sum in another order
OTHER_IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def sparse_route(name):
    """The embedding_bag route is the gather path with the native kernels switched off."""
    return native.disabled() if name == "sltrain-embedding-bag" else contextlib.nullcontext()


def structured_llama(name):
    model = lsparam.parametrize(tiny_llama(0, num_hidden_layers=1), CONFIGS[name])  # compile time grows with depth
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every factor off its init (SLTrain's B = 0 would hide the low-rank path)
        for param_name, param in model.named_parameters():
            if ".original" in param_name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


@contextlib.contextmanager
def no_warnings_or_logged_warnings():
    """Fail on any Python warning a user would see, and on any WARNING record of torch's loggers (where
    Dynamo and Inductor report), such as the old "Dynamo does not know how to trace the builtin
    `_make_wrapper_subclass`" at every compile."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("torch")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # hidden by Python's default filters outside __main__ (Inductor's first import raises some)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.removeHandler(handler)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not messages, messages


def step(model, ids, forward=None):
    """One forward and backward of ``model`` (through ``forward``, its compiled form, if given): the logits
    and every parameter's gradient, by name."""
    out = (model if forward is None else forward)(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


def assert_same_step(actual, expected, tolerance):
    """The logits and every parameter's gradient of two steps (:func:`step`) agree."""
    (logits, grads), (eager_logits, eager_grads) = actual, expected
    torch.testing.assert_close(logits, eager_logits, **tolerance)
    assert grads.keys() == eager_grads.keys()
    for n, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[n], **tolerance, msg=lambda m, n=n: f"{n}: {m}")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiles_as_one_graph_without_warnings_and_matches_eager(name, monkeypatch):
    model = structured_llama(name)
    graphs = []

    def refuse(*args):
        raise AssertionError("the forward materialised a dense weight")

    # the factorised forward, in eager and inside the graph: nothing reads a layer's weight as a matrix
    for _, parametrization in lsparam.structured_layers(model).values():
        monkeypatch.setattr(type(parametrization), "dense", refuse)

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(model, backend=counting_aot_eager, fullgraph=True)  # a graph break raises
    with sparse_route(name):
        eager = step(model, IDS)
        with no_warnings_or_logged_warnings():
            first = step(model, IDS, compiled)
        # a second step on other tokens reuses the graph: the weights built inside it put no guard on anything
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = step(model, OTHER_IDS, compiled)
        eager_second = step(model, OTHER_IDS)
    assert len(graphs) == 1
    assert_same_step(first, eager, TOLERANCE)
    assert_same_step(second, eager_second, TOLERANCE)


@pytest.mark.slow
def test_inductor_matches_eager_with_the_native_sparse_kernels():
    """Inductor (C++ codegen on CPU) around lsparam's custom ops, whose ``out`` arguments it functionalises."""
    model = structured_llama("sltrain-gather")
    eager = step(model, IDS)
    with no_warnings_or_logged_warnings():
        compiled = step(model, IDS, torch.compile(model, fullgraph=True))
    assert_same_step(compiled, eager, TOLERANCE)


def test_conv1d_weight_compiles_without_a_graph_break():
    """transformers' Conv1D (weight stored in×out): ``addmm(bias, x, W)`` is factorised inside the graph too."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = lsparam.parametrize(nn.Sequential(Conv1D(24, 16)), lsparam.LOSTConfig(rank=4, channel_ratio=0.25))
    x = torch.randn(3, 5, 16)
    expected = model(x)
    with no_warnings_or_logged_warnings():
        actual = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_an_op_that_bypasses_torch_function_reads_nan_not_a_matrix():
    """The weight's storage is one NaN broadcast to its shape: code that reaches it with torch-function
    handling disabled gets NaN, never a plausible matrix."""
    layer = nn.Linear(16, 8)
    lsparam.parametrize(layer, lsparam.LowRankConfig(rank=4), target_modules=None)
    weight = layer.weight
    with torch._C.DisableTorchFunctionSubclass():
        assert weight.untyped_storage().nbytes() == weight.element_size()
        assert torch.isnan(weight + 0).all()
    assert torch.isfinite(weight + 0).all()  # through __torch_function__: the dense matrix B A


def test_the_csr_custom_ops_declare_what_compile_relies_on():
    """Schemas and shape-only implementations (strides included) agree with the real products."""
    support = SparseSupport(uniform_flat_indices(40 * 30, 90, 0), (40, 30), persistent=False)
    x, grad, values = torch.randn(20, 30), torch.randn(20, 40), torch.randn(90)
    crow, col = support.crow_indices, support.col_indices
    torch.library.opcheck(csr_ops.csr_mm, (crow, col, values, x, 40))
    torch.library.opcheck(csr_ops.csr_entry_dots, (crow, col, values, grad, x))
    dense = support.to_dense(values)
    torch.testing.assert_close(csr_ops.csr_mm(crow, col, values, x, 40), x @ dense.t())
    torch.testing.assert_close(csr_ops.csr_entry_dots(crow, col, values, grad, x), (grad.t() @ x)[dense != 0])


def test_the_kept_placeholder_follows_the_factors():
    """The placeholder is kept between forwards (see lsparam/weight.py) and remade when the factors' dtype
    or device changes: the weight's metadata are always the factors'."""
    layer = nn.Linear(16, 8)
    lsparam.parametrize(layer, lsparam.LowRankConfig(rank=4), target_modules=None)
    assert layer.weight.dtype == torch.float32
    layer.double()
    assert layer.weight.dtype == torch.float64
    assert layer(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64
    layer.to("meta")
    assert layer.weight.device.type == "meta" and tuple(layer.weight.shape) == (8, 16)


def test_the_lean_head_compiles_in_the_same_graph_and_matches_eager():
    """The recipe's default head (chunked loss, gradients made in the forward) adds no graph break."""
    model = use_lean_head(structured_llama("sltrain-gather"), chunk_tokens=12)  # 2 x 15 predicted tokens: 3 chunks
    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def loss_and_grads(forward):
        loss = forward(input_ids=IDS, labels=IDS).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    eager = loss_and_grads(model)
    with no_warnings_or_logged_warnings():
        compiled = loss_and_grads(torch.compile(model, backend=counting_aot_eager, fullgraph=True))
    assert len(graphs) == 1
    torch.testing.assert_close(compiled[0], eager[0], **TOLERANCE)
    for n, grad in compiled[1].items():
        torch.testing.assert_close(grad, eager[1][n], **TOLERANCE, msg=lambda m, n=n: f"{n}: {m}")
