"""The one training step the benchmarks time and measure: a LLaMA of a preset size, a method, an optimizer.

``recipes/bench/step.py`` (speed) and ``recipes/bench/memory.py`` (peak memory against the ledger) build
their models here, so both measure the same thing; ``recipes/bench/quality/`` trains through
``recipes/pretrain.py`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class TrainingStep:
    step: Callable[[], None]  # forward, backward, optimizer update, zero_grad (synchronized on CUDA)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build_training_step(size: str, method: str, *, batch_size: int, seq_len: int, state_bits: int = 32,
                        per_layer: bool = False, dtype: torch.dtype | None = None, compiled: bool = False,
                        optimizer_kwargs: dict | None = None, lr: float = 1e-3, seed: int = 0,
                        lean_head: bool = False) -> TrainingStep:
    """A ``size`` LLaMA (``lsparam.presets.llama_config``) with ``method`` at its per-size defaults
    (``method_config``; ``"cola-m"`` is CoLA with ``checkpoint=True``), AdamW in ``LeanOptimizer`` and one random batch, on CUDA when there is one.

    ``dtype`` defaults to float32; ``compiled`` runs the forward under ``torch.compile``; ``lean_head``
    computes the loss with ``lsparam.lean_head`` (no full logits).
    """
    from transformers import AutoModelForCausalLM

    import lsparam
    from lsparam.presets import llama_config, method_config

    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or torch.float32
    config = llama_config(size)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype).to(device)
    settings = method_config(method, size)
    if settings is not None:
        lsparam.parametrize(model, settings, progress=False)
    if lean_head:
        from lsparam.lean_head import use_lean_head

        use_lean_head(model)
    optimizer = lsparam.optim.LeanOptimizer(model, torch.optim.AdamW, lr=lr, per_layer=per_layer,
                                            state_bits=state_bits, **(optimizer_kwargs or {}))
    forward = torch.compile(model) if compiled else model
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)

    def step() -> None:
        forward(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return TrainingStep(step, model, optimizer, device)
