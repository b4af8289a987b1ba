"""The memory ledger's prediction: what a training step needs, by kind, from shapes alone.

:func:`estimate` works from a ``transformers`` config: the model is built from fake tensors (shapes and
dtypes, no storage), parametrized there, and one forward is traced to count the activations autograd
saves. It answers for LLaMA-7B in about a second.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from lsparam.api import parametrize, structured_layers
from lsparam.extras import require
from lsparam.lean_head import DEFAULT_CHUNK_TOKENS, use_lean_head
from lsparam.optim.lean import STEP_BLOCK_ELEMENTS
from lsparam.optim.lowbit import state_bytes
from lsparam.presets import llama_config, method_config
from lsparam.sparse import native
from lsparam.sparse.matmul import resolve_backend

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1}  # full-size states per parameter (sgd: momentum)


@dataclass
class MemoryBreakdown:
    """Bytes of one training step, by kind. ``total`` is the modelled peak (see ``peak_phase``).

    Activations and a full set of gradients never coexist (backward frees the one as it makes the
    other), so ``total`` is the larger of two moments rather than the sum of every column:

    - start of backward: parameters + optimizer states + indices + activations + transient (the
      gradient of the logits);
    - optimizer step: parameters + gradients + optimizer states + indices + transient of the step.

    With per-layer updates the steps run inside backward: the peak is the start of backward plus one
    parameter's gradient and its step's temporaries.
    """

    parameters: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    sparse_indices: int = 0
    activations: int = 0
    transient: int = 0
    total: int = 0
    peak_phase: str = ""
    parameter_count: int = 0
    notes: list = field(default_factory=list)

    @property
    def paper(self) -> int:
        """The GaLore / SLTrain table convention: weights + optimizer states (+ sparse indices)."""
        return self.parameters + self.optimizer_states + self.sparse_indices

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["paper"] = self.paper
        return out

    def __str__(self) -> str:
        rows = [(name, getattr(self, name)) for name in
                ("parameters", "gradients", "optimizer_states", "sparse_indices", "activations", "transient")]
        rows += [("total (peak)", self.total), ("paper convention", self.paper)]
        return "\n".join(f"{name:<18} {value / 2**20:10.1f} MiB" for name, value in rows)


def _index_bytes(model: nn.Module, device: torch.device, param_dtype: torch.dtype) -> int:
    """Index bytes each parametrization reports for a run on ``device`` in ``param_dtype`` (supports and the
    caches its path builds, kept channels)."""
    return sum(p.index_bytes(device, param_dtype) for _, p in structured_layers(model).values())


def _owned_storages(model: nn.Module) -> set:
    """Keys of the storages the model holds whatever the step does: parameters, buffers, and the index
    tensors of its parametrizations, caches built on first use (the transposed support) included."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        if hasattr(module, "index_tensors"):
            tensors += module.index_tensors()
    return {_storage_key(t) for t in tensors}


def _storage_key(tensor: torch.Tensor) -> int:
    # A view's own storage handle can differ from its base's under fake tensors: key by the base.
    return (tensor._base if tensor._base is not None else tensor).untyped_storage()._cdata


class _SavedTensorCounter:
    """Bytes of the distinct storages autograd saves during a forward that the model does not hold anyway.

    A saved parameter, buffer or support index is resident whether or not backward needs it, and is
    counted once, under its own heading: only the rest are activations. What the model holds is read
    after the forward (:meth:`total`), so that caches the forward builds count as the model's too.
    """

    def __init__(self):
        self.storages = {}

    def pack(self, tensor):
        base = tensor._base if tensor._base is not None else tensor
        self.storages[_storage_key(tensor)] = base.untyped_storage().nbytes()
        return tensor

    def total(self, model: nn.Module) -> int:
        owned = _owned_storages(model)
        return sum(nbytes for key, nbytes in self.storages.items() if key not in owned)


def _build_shape_model(config, method, dtype: torch.dtype, layers: int | None = None):
    """The model with fake CPU tensors: shapes and dtypes, no storage. Fake CPU tensors (rather than
    meta ones) make attention choose the kernel a CPU run would, which decides what it saves."""
    AutoModelForCausalLM = require("transformers", "hf", "the memory ledger of a model config").AutoModelForCausalLM
    if layers is not None:
        config = type(config).from_dict({**config.to_dict(), "num_hidden_layers": layers})
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if isinstance(method, dict):  # a model's own layout (_layer_plan): its layers, each with its config
            parametrize(model, method, target_modules=lambda _, name: any(re.search(k, name) for k in method),
                        progress=False)
        elif method is not None:
            parametrize(model, method, progress=False)
    return model


def _layer_plan(model: nn.Module) -> tuple[dict, list[str]]:
    """``{regex: config}`` that parametrizes a model built from the same config as ``model`` is: each
    decoder layer as its first parametrized one (the traces have one and two decoder layers), other layers
    by name; and notes where the decoder layers differ."""
    plan, notes = {}, []
    per_index: dict[int, dict[str, object]] = {}
    for name, (_, parametrization) in structured_layers(model).items():
        found = re.search(r"(?:^|\.)layers\.(\d+)\.(.+)$", name)
        if found is None:
            plan[f"^{re.escape(name)}$"] = parametrization.config
        else:
            per_index.setdefault(int(found.group(1)), {})[found.group(2)] = parametrization.config
    if per_index:
        first_index = min(per_index)
        for suffix, config in per_index[first_index].items():
            plan[rf"(?:^|\.)layers\.\d+\.{re.escape(suffix)}$"] = config
        if any(layers != per_index[first_index] for layers in per_index.values()):
            notes.append(f"decoder layers are parametrized differently: activations traced as layer {first_index}'s")
    return plan, notes


def _sparse_path(config, device: torch.device, dtype: torch.dtype) -> str:
    """The SLTrain path whose saved tensors a run on ``device`` in ``dtype`` would have: ``"gather"``
    saves ``x``, ``x Aᵀ`` and the factors; the CSR, scatter and 2:4 paths save what ``"scatter"`` does
    (``x`` and the values for the sparse part, the low-rank GEMMs' inputs: ``x`` and ``s·x Aᵀ``)."""
    backend = config.sparse_backend
    if backend == "auto":
        backend = resolve_backend("auto", device, dtype, config.density)
    return "gather" if backend == "gather" else "scatter"


@contextlib.contextmanager
def _paths_of_a_run(model: nn.Module, device: torch.device, dtype: torch.dtype):
    """Within the block, the shape-only ``model``'s SLTrain layers take the path a run on ``device`` would
    take (or one that saves the same tensors), where by themselves they take the scatter path on shapes.
    The native kernels need data: the gather path runs through ``embedding_bag``, which saves the same."""
    patched = []
    for _, parametrization in structured_layers(model).values():
        if hasattr(parametrization, "backend_for") and hasattr(parametrization, "support"):
            path = _sparse_path(parametrization.config, device, dtype)
            parametrization.backend_for = lambda x, path=path: path
            patched.append(parametrization)
    try:
        with native.disabled():
            yield
    finally:
        for parametrization in patched:
            del parametrization.backend_for


def _traced_activations(config, method, dtype, batch_size: int, seq_len: int, layers: int, device,
                        lean_head: bool) -> int:
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _build_shape_model(config, method, dtype, layers)
        if lean_head:
            use_lean_head(model)
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        counter = _SavedTensorCounter()
        with _paths_of_a_run(model, device, dtype), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            output = model(input_ids=ids, labels=ids)
        total = counter.total(model)  # while the output keeps the graph, and so every saved tensor, alive
        del output
    if lean_head:  # the chunked head keeps its gradients on its node, beside autograd's saved tensors
        total += (batch_size * (seq_len - 1) + config.vocab_size) * config.hidden_size * dtype.itemsize
    return total


_TRACES: dict = {}  # traces depend only on these arguments: the CLI asks for each one four times


def _activations(config, method, dtype, batch_size, seq_len, checkpointing: bool, device, lean_head: bool) -> int:
    """Activation bytes from traces of 1- and 2-layer models, extrapolated to the config's depth."""
    key = (config.to_json_string(), repr(method), dtype, batch_size, seq_len, device.type, lean_head)
    if key not in _TRACES:
        _TRACES[key] = tuple(
            _traced_activations(config, method, dtype, batch_size, seq_len, n, device, lean_head) for n in (1, 2))
    one, two = _TRACES[key]
    per_layer, outside = two - one, 2 * one - two
    layers = config.num_hidden_layers
    if checkpointing:  # each layer keeps its input; one layer's activations exist during recompute
        layer_input = batch_size * seq_len * config.hidden_size * dtype.itemsize
        return outside + layers * layer_input + per_layer
    return outside + layers * per_layer


def estimate(
    model_or_config,
    method=None,
    *,
    optimizer: str = "adamw",
    state_bits: int = 32,
    per_layer: bool = False,
    param_dtype="bf16",
    batch_size: int = 1,
    seq_len: int = 256,
    activation_checkpointing: bool = False,
    fused: bool = True,
    device="cpu",
    lean_head: bool = False,
) -> MemoryBreakdown:
    """Predict the memory of one training step, by kind.

    Args:
        model_or_config: a ``transformers`` config, a size name from ``lsparam.presets`` (e.g.
            ``"llama_7b"``), or a model (parametrized or not; counted as it is).
        method: ``None``/``"full"``, ``"lowrank"``, ``"sltrain"``, ``"lost"``, ``"lost-silu"``, ``"cola"``,
            ``"cola-m"`` (papers' per-size defaults) or a config object, for a config or a size name. A model
            is counted as it is: parametrize it first, and leave ``method`` out.
        optimizer: ``"adamw"``, ``"adam"`` (2 states) or ``"sgd"`` (momentum).
        state_bits: 32, 8 or 4 (torchao's low-bit states, as ``LeanOptimizer`` uses them).
        per_layer: updates inside backward: only one parameter's gradient exists at a time.
        param_dtype: ``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype (weights, gradients, activations).
        batch_size, seq_len: the micro-batch.
        activation_checkpointing: keep only each decoder layer's input for backward.
        fused: 32-bit states updated by torch's fused kernel (``LeanOptimizer``'s default), which makes
            no step temporaries; False for the unfused loop (``foreach=False``).
        device: where the step runs, ``"cpu"`` or ``"cuda"``: it decides SLTrain's sparse path, so which
            index caches exist and what the path saves for backward.
        lean_head: the loss is computed by :func:`lsparam.lean_head.use_lean_head`'s chunked head (the
            full logits never exist) instead of the model's own head.

    Example:
        >>> from lsparam.memory import estimate
        >>> full = estimate("llama_60m", "full", param_dtype="fp32")
        >>> lean = estimate("llama_60m", "sltrain", state_bits=8, per_layer=True, param_dtype="fp32")
        >>> round(full.parameter_count / 1e6, 1), round(lean.parameter_count / 1e6, 1)
        (58.1, 43.5)
        >>> round(lean.total / full.total, 2)  # measured on CPU: the memory section of docs/benchmarks.md
        0.49
    """
    dtype = _DTYPES.get(param_dtype, param_dtype)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(  # noqa: TRY004 - a wrong name ('int8') as often as a wrong type
            f"param_dtype must be one of {list(_DTYPES)} or a torch.dtype; got param_dtype={param_dtype!r}")
    if optimizer not in _OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {list(_OPTIMIZER_STATES)}; got optimizer={optimizer!r}")
    if state_bits not in (32, 8, 4):
        raise ValueError(f"state_bits must be 32, 8 or 4; got state_bits={state_bits!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {name}={value!r}")

    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda'; got device={str(device)!r}")

    if isinstance(model_or_config, nn.Module) and method is not None:
        raise ValueError(f"method is for a config or a size name; a model is counted as it is (parametrize it "
                         f"first and leave method out); got method={method!r} with a model")
    size = model_or_config if isinstance(model_or_config, str) else None
    if isinstance(model_or_config, str):
        model_or_config = llama_config(model_or_config)
    if isinstance(method, str):
        method = method_config(method, size)
    plan_notes: list[str] = []
    if isinstance(model_or_config, nn.Module):
        model, config = model_or_config, getattr(model_or_config, "config", None)
        if structured_layers(model):
            method, plan_notes = _layer_plan(model)
    else:
        config = model_or_config
        model = _build_shape_model(config, method, dtype)

    breakdown = MemoryBreakdown(notes=plan_notes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    itemsize = dtype.itemsize
    breakdown.parameter_count = sum(p.numel() for p in model.parameters())
    breakdown.parameters = breakdown.parameter_count * itemsize
    per_state = _OPTIMIZER_STATES[optimizer]
    breakdown.optimizer_states = sum(state_bytes(p.numel(), state_bits, itemsize, per_state) for p in trainable)
    breakdown.sparse_indices = _index_bytes(model, device, dtype)
    largest = max((p.numel() for p in trainable), default=0)
    breakdown.gradients = (largest if per_layer else sum(p.numel() for p in trainable)) * itemsize

    backward_transient = 0
    if config is not None:
        breakdown.activations = _activations(config, method, dtype, batch_size, seq_len, activation_checkpointing,
                                             device, lean_head)
        if lean_head:
            backward_transient = _lean_head_transient(config, batch_size * (seq_len - 1), itemsize)
        else:  # backward starts from the gradient of the logits, as large as the logits themselves
            backward_transient = batch_size * seq_len * config.vocab_size * 4
    else:
        breakdown.notes.append("no transformers config: activations not estimated")
    # optimizer step temporaries, per parameter updated (measured, docs/benchmarks.md): none for torch's
    # fused kernel; its single-tensor loop makes about two the size of the parameter (AdamW) or one
    # (SGD); torchao's compiled low-bit step two fp32 copies of what it updates, which LeanOptimizer
    # bounds by updating large tensors in blocks of rows (STEP_BLOCK_ELEMENTS)
    if state_bits != 32:
        step_transient = 2 * 4 * min(largest, STEP_BLOCK_ELEMENTS)
    elif fused:
        step_transient = 0
    else:
        step_transient = (1 if optimizer == "sgd" else 2) * largest * itemsize

    resident = breakdown.parameters + breakdown.optimizer_states + breakdown.sparse_indices
    if per_layer:  # updates run inside backward, while the activations are still alive
        breakdown.peak_phase = "backward"
        if lean_head:
            # the head's gradient is among the activations (made in the forward, handed on without a copy);
            # three moments: the forward's last chunk, the head's update as backward starts, and the last
            # update (the embedding's: its gradient, with nearly every activation freed)
            breakdown.transient = max(backward_transient, step_transient)
            extra = max(breakdown.activations + breakdown.transient, breakdown.gradients + step_transient)
        else:  # the logits' gradient starts backward; by the head's update the saved fp32 logits (as large
            # as that gradient) are freed, and the head's gradient and the step's temporaries exist instead
            breakdown.transient = max(backward_transient, breakdown.gradients + step_transient - backward_transient)
            extra = breakdown.activations + breakdown.transient
        breakdown.total = resident + extra
        return breakdown
    backward_peak = resident + breakdown.activations + backward_transient
    step_peak = resident + breakdown.gradients + step_transient
    if backward_peak >= step_peak:
        breakdown.total, breakdown.peak_phase, breakdown.transient = backward_peak, "backward", backward_transient
    else:
        breakdown.total, breakdown.peak_phase, breakdown.transient = step_peak, "optimizer step", step_transient
    return breakdown


def _lean_head_transient(config, predicted_tokens: int, itemsize: int) -> int:
    """Bytes the chunked head holds at its peak beyond the activations (which count its two gradients).

    A chunk's fp32 logits (the softmax and then its gradient are made in their memory); the final hidden
    states and their shifted copy, the head's input (both alive while the head's forward runs); below
    fp32, the chunk's logits in the model's dtype beside them as they are upcast (and the gradient's copy
    in that dtype, as large); with several chunks, also one chunk's input gradient before it is written
    into place and the fp32 sum of the head's gradient (beside the copy kept). Measured on CPU in fp32
    at LLaMA-60M, 1, 4 and 8 sequences of 256 tokens (one and two chunks).
    """
    chunk_tokens = min(DEFAULT_CHUNK_TOKENS, predicted_tokens)
    several_chunks = predicted_tokens > DEFAULT_CHUNK_TOKENS
    logits = chunk_tokens * config.vocab_size * 4
    low_precision_copy = chunk_tokens * config.vocab_size * itemsize if itemsize < 4 else 0
    hidden_states = (2 * predicted_tokens + (chunk_tokens if several_chunks else 0)) * config.hidden_size * itemsize
    gradient_sum = config.vocab_size * config.hidden_size * 4 if several_chunks and itemsize < 4 else 0
    return logits + low_precision_copy + hidden_states + gradient_sum
