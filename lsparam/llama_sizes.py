"""The LLaMA shapes the SLTrain, LOST and GaLore papers train (METHODS.md), plus two CPU-sized ones.

>>> llama_config("llama_60m").hidden_size
512
"""

from __future__ import annotations

# name: (hidden, intermediate, layers, heads); vocabulary 32000 (the T5 tokenizer) for all.
LLAMA_SIZES = {
    "llama_9m": (128, 352, 4, 4),
    "llama_20m": (256, 688, 4, 4),
    "llama_60m": (512, 1376, 8, 8),
    "llama_130m": (768, 2048, 12, 12),
    "llama_350m": (1024, 2736, 24, 16),
    "llama_1b": (2048, 5461, 24, 32),
    "llama_7b": (4096, 11008, 32, 32),
}
VOCAB_SIZE = 32000


def llama_config(name: str, **overrides):
    """A ``transformers.LlamaConfig`` for one of :data:`LLAMA_SIZES` (no download)."""
    from transformers import LlamaConfig

    if name not in LLAMA_SIZES:
        raise ValueError(f"unknown model size {name!r}; valid: {sorted(LLAMA_SIZES)}")
    hidden, intermediate, layers, heads = LLAMA_SIZES[name]
    settings = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)
