"""The memory ledger: what a training step needs, predicted from shapes and measured on a device.

:func:`estimate` works from a ``transformers`` config alone: the model is built from fake tensors (shapes
and dtypes, no storage), parametrized there, and one forward is traced to count the activations
autograd saves. It answers for LLaMA-7B in about a second.

:func:`measure` runs a training step and reports its peak: CUDA allocator statistics on GPU; on CPU the
allocator's own allocation and free events (``torch.profiler``), not process RSS, which the allocator
and the Python heap blur.
"""

from lsparam.memory.ledger import MemoryBreakdown, estimate
from lsparam.memory.peak import MeasuredPeak, measure

__all__ = ["MeasuredPeak", "MemoryBreakdown", "estimate", "measure"]
