"""The memory ledger's measurement: the peak bytes tensors held while a function ran.

:func:`measure` reads CUDA's allocator statistics on GPU; on CPU the allocator's own allocation and free
events (``torch.profiler``), not process RSS, which the allocator and the Python heap blur.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake


@dataclass
class MeasuredPeak:
    """The peak bytes held by tensors while ``fn`` ran, and what was held before it started."""

    peak: int
    baseline: int
    device: str

    def __str__(self) -> str:
        return f"peak {self.peak / 2**20:.1f} MiB on {self.device} (held before: {self.baseline / 2**20:.1f} MiB)"


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct CPU storages behind ``tensors`` (sparse arrays and wrapper subclasses unpacked)."""
    seen = {}

    def add(tensor):
        if tensor.device.type != "cpu":
            return
        if tensor.layout == torch.sparse_csr:
            for part in (tensor.crow_indices(), tensor.col_indices(), tensor.values()):
                add(part)
        elif hasattr(tensor, "__tensor_flatten__"):  # wrapper subclasses (torchao states): their inner tensors
            for name in tensor.__tensor_flatten__()[0]:
                add(getattr(tensor, name))
        elif tensor.layout == torch.strided and not is_fake(tensor):  # fake tensors (compile caches) hold nothing
            storage = tensor.untyped_storage()
            seen[storage._cdata] = storage.nbytes()

    for tensor in tensors:
        add(tensor)
    return sum(seen.values())


def _live_tensors():
    with warnings.catch_warnings():  # isinstance() on some torch objects warns about deprecations
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if _is_tensor(obj)]
    return objects


def _is_tensor(obj) -> bool:
    try:
        return isinstance(obj, torch.Tensor)
    except ReferenceError:
        return False


def measure(fn, *, device=None) -> MeasuredPeak:
    """Run ``fn()`` (e.g. one training step) and report the peak memory held by tensors.

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: the storages of every tensor alive at the
    start, plus the running balance of the allocator's allocations and frees while ``fn`` runs
    (recorded by ``torch.profiler`` with ``profile_memory=True``).

    Example:
        >>> import torch
        >>> from lsparam.memory import measure
        >>> x = torch.ones(1024, 1024)  # 4 MiB held before
        >>> result = measure(lambda: (x * 2).sum(), device="cpu")  # plus a 4 MiB temporary
        >>> result.baseline >= 4 * 2**20, (result.peak - result.baseline) // 2**20
        (True, 4)
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return MeasuredPeak(torch.cuda.max_memory_allocated(device), baseline, str(device))
    gc.collect()
    baseline = _storage_bytes(_live_tensors())
    # The profiler sees every allocation and free of the CPU allocator, compiled code included
    # (a dispatch-mode tracker would stop torchao's compiled optimizer steps).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    current = highest = 0
    for _, nbytes in changes:
        current += nbytes
        highest = max(highest, current)
    return MeasuredPeak(baseline + highest, baseline, "cpu")
