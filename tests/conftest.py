"""Shared fixtures: a tiny LLaMA for integration tests, and the hypothesis profile used in CI."""

import pytest
import torch
from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.recipe_runs"]  # the recipe tests' corpora and helpers (corpus, aligned, ...)

# One intra-op thread: the test shapes are tiny (d = 64), and on a small, shared CI runner a second
# OpenMP thread competing for a busy core makes the same step 10-50x slower, not faster.
torch.set_num_threads(1)

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def tiny_llama(seed=0, **overrides):
    """A 2-layer, d=64 ``LlamaForCausalLM`` with a deterministic init, in eval mode (no dropout anyway)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.eval()


@pytest.fixture
def llama():
    """A fresh tiny LLaMA (seed 0)."""
    return tiny_llama(0)


@pytest.fixture
def llama_factory():
    """``tiny_llama`` itself, for tests that need several models or other seeds/overrides."""
    return tiny_llama
