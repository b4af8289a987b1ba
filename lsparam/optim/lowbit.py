"""torchao's low-bit optimizers: which tensors get low-bit states and their size, and the states as plain
tensors for ``weights_only`` checkpoints."""

from __future__ import annotations

import math

import torch

from lsparam.extras import require

# torchao's block sizes (its constructors' defaults) and the size below which it keeps states in full
# precision. The memory ledger and LeanOptimizer both follow these, from here.
LOWBIT_BLOCK = {8: 256, 4: 128}
MIN_LOWBIT_NUMEL = 4096
# Each low-bit state also holds its own float32 code table (torchao's qmap): 2^bits entries.
QMAP_BYTES = {bits: 4 * 2**bits for bits in LOWBIT_BLOCK}


def state_bytes(numel: int, state_bits: int, param_bytes: int, per_state: int) -> int:
    """Bytes of ``per_state`` optimizer states of one ``numel``-element tensor under LeanOptimizer: in the
    parameter's dtype at 32 bits and for small tensors; else ``state_bits`` per element (padded to whole
    blocks, as LeanOptimizer pads), a 4-byte scale per block and the state's code table.

    >>> state_bytes(4096, 8, 4, 2), state_bytes(100, 8, 4, 2)  # 2 x (4096 codes + 16 scales + 256-entry table)
    (10368, 800)
    """
    if state_bits == 32 or numel < MIN_LOWBIT_NUMEL:
        return per_state * numel * param_bytes
    block = LOWBIT_BLOCK[state_bits]
    padded = math.ceil(numel / block) * block
    return per_state * (padded * state_bits // 8 + (padded // block) * 4 + QMAP_BYTES[state_bits])


def _torchao_classes():
    optim = require("torchao.optim", "lowbit", "low-bit optimizer states (state_bits 8 or 4)")
    return {
        (torch.optim.AdamW, 8): optim.AdamW8bit,
        (torch.optim.AdamW, 4): optim.AdamW4bit,
        (torch.optim.Adam, 8): optim.Adam8bit,
        (torch.optim.Adam, 4): optim.Adam4bit,
    }


def lowbit_optimizer_class(optimizer_cls: type, bits: int) -> type:
    """torchao's ``bits``-bit version of ``optimizer_cls``, or a ``ValueError`` naming what exists.

    >>> lowbit_optimizer_class(torch.optim.AdamW, 8).__name__
    'AdamW8bit'
    """
    classes = _torchao_classes()
    found = classes.get((optimizer_cls, bits))
    if found is None:
        supported = sorted({f"{cls.__module__}.{cls.__name__}" for cls, _ in classes})
        raise ValueError(
            f"state_bits={bits} needs a torchao low-bit version of optimizer_cls={optimizer_cls.__name__}; "
            f"torchao has them for {supported} (state_bits 8 and 4). Use state_bits=32 for other optimizers."
        )
    return found


def default_block_size(lowbit_cls: type) -> int:
    """torchao quantises states per block of this many elements (its constructors' default)."""
    import inspect

    return inspect.signature(lowbit_cls.__init__).parameters["block_size"].default


def _state_classes():
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit

    return {cls.__name__: cls for cls in (OptimState8bit, OptimState4bit)}


def is_lowbit_state(value) -> bool:
    return type(value).__name__ in _state_classes() and isinstance(value, torch.Tensor)


def state_to_plain(value):
    """A torchao low-bit state as a dict of plain tensors and primitives (others unchanged)."""
    if not is_lowbit_state(value):
        return value
    names, attributes = value.__tensor_flatten__()
    plain_attrs = [
        str(a).removeprefix("torch.") if isinstance(a, torch.dtype) else (list(a) if isinstance(a, torch.Size) else a)
        for a in attributes
    ]
    return {
        "lowbit_class": type(value).__name__,
        "tensors": {name: getattr(value, name) for name in names},
        "attributes": plain_attrs,
        "attribute_kinds": ["dtype" if isinstance(a, torch.dtype) else "size" if isinstance(a, torch.Size) else "value" for a in attributes],
    }


def state_from_plain(value):
    """Inverse of :func:`state_to_plain`."""
    if not (isinstance(value, dict) and "lowbit_class" in value):
        return value
    cls = _state_classes()[value["lowbit_class"]]
    attributes = [
        getattr(torch, a) if kind == "dtype" else torch.Size(a) if kind == "size" else a
        for a, kind in zip(value["attributes"], value["attribute_kinds"])
    ]
    return cls.__tensor_unflatten__(value["tensors"], attributes, None, None)
