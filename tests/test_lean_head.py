"""lsparam/lean_head.py: the chunked LM head and loss equal transformers' plain path, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from lsparam.lean_head import causal_lm_loss, use_lean_head
from tests.conftest import tiny_llama


def plain_loss(hidden, weight, labels):
    """The reference: the full logits, next-token cross-entropy, mean over the targets not ignored."""
    logits = F.linear(hidden[:, :-1], weight)
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), labels[:, 1:].reshape(-1), ignore_index=-100)


def test_the_reference_is_transformers_own_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, weight = torch.randn(2, 7, 5), torch.randn(9, 5)
    labels = torch.randint(0, 9, (2, 7))
    labels[0, 3] = -100
    torch.testing.assert_close(plain_loss(hidden, weight, labels),
                               ForCausalLMLoss(F.linear(hidden, weight), labels, vocab_size=9))


@given(batch=st.integers(1, 3), seq=st.integers(2, 9), d=st.integers(1, 6), vocab=st.integers(2, 13),
       chunk=st.integers(1, 30), ignored=st.floats(0, 0.9), seed=st.integers(0, 2**16))
def test_loss_and_gradients_equal_the_plain_path(batch, seq, d, vocab, chunk, ignored, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, d, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, d, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[torch.rand(batch, seq, generator=generator) < ignored] = -100

    expected = plain_loss(hidden, weight, labels)
    lean = causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk)
    if torch.isnan(expected):  # every target ignored: the plain mean is 0/0
        assert lean.item() == 0.0
        return
    torch.testing.assert_close(lean, expected, rtol=1e-12, atol=1e-12)
    scale = torch.rand((), dtype=torch.float64, generator=generator) + 0.5  # backward scales by the incoming gradient
    want = torch.autograd.grad(expected * scale, (hidden, weight))
    got = torch.autograd.grad(lean * scale, (hidden, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the evaluation path computes no gradient and the same loss
        torch.testing.assert_close(causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk), expected)


@pytest.mark.parametrize("tied", [False, True])
def test_a_llama_with_the_lean_head_has_the_plain_loss_and_gradients(tied):
    plain = tiny_llama(0, tie_word_embeddings=tied).double().train()
    lean = use_lean_head(tiny_llama(0, tie_word_embeddings=tied).double().train(), chunk_tokens=5)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    # transformers' own loss upcasts to float32; the reference keeps float64 (its semantics: test above)
    expected = F.cross_entropy(plain(input_ids=ids).logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    got = lean(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    expected.backward()
    got.backward()
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert lean(input_ids=ids).logits.shape == (2, 12, 128)  # without labels: the plain forward


def test_num_items_in_batch_divides_the_summed_loss_as_transformers_does():
    # Trainer, accumulating gradients over micro-batches, passes the window's target count to a model whose
    # forward takes loss kwargs, and stops dividing by the number of micro-batches itself
    plain = tiny_llama(0).double().train()
    lean = use_lean_head(tiny_llama(0).double().train(), chunk_tokens=5)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    window = 3 * ids[:, 1:].numel()  # as if this were one of three micro-batches
    summed = F.cross_entropy(plain(input_ids=ids).logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1),
                             reduction="sum")
    expected = summed / window
    got = lean(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(window)).loss
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # transformers' own loss with the same count (its logits upcast to float32)
        own = plain(input_ids=ids, labels=ids, num_items_in_batch=window).loss
    torch.testing.assert_close(got, own.to(got.dtype), rtol=1e-6, atol=1e-7)
    expected.backward()
    got.backward()
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_a_parametrized_head_is_refused():
    import lsparam

    model = lsparam.parametrize(tiny_llama(0), lsparam.LowRankConfig(rank=8), target_modules=["lm_head"])
    with pytest.raises(ValueError, match="lm_head is parametrized"):
        use_lean_head(model)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int; got chunk_tokens=0"):
        causal_lm_loss(torch.zeros(1, 2, 3), torch.zeros(4, 3), torch.zeros(1, 2, dtype=torch.long), chunk_tokens=0)
    with pytest.raises(ValueError, match="bias-free nn.Linear .lm_head"):
        use_lean_head(torch.nn.Linear(2, 2))


def test_backward_scales_by_the_incoming_gradient_and_hands_the_head_gradient_on_without_a_copy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7))
    reference = F.cross_entropy((hidden[:, :-1] @ weight.T).reshape(-1, 11), labels[:, 1:].reshape(-1))
    expected = torch.autograd.grad(2.5 * reference, (hidden, weight))
    loss = causal_lm_loss(hidden, weight, labels, chunk_tokens=4)
    made_in_forward = loss.grad_fn.grads[1].data_ptr()
    (2.5 * loss).backward()
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight.grad, expected[1], rtol=1e-12, atol=1e-12)
    assert weight.grad.data_ptr() == made_in_forward  # the forward's tensor became .grad: no second copy


def test_a_second_backward_through_the_lean_head_is_a_clear_error():
    hidden = torch.randn(1, 5, 4, requires_grad=True)
    loss = causal_lm_loss(hidden, torch.randn(6, 4, requires_grad=True), torch.randint(0, 6, (1, 5)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        loss.backward()


@pytest.mark.parametrize("chunk", [4, 1024])  # several chunks (fp32 sums), one chunk (made in bf16)
def test_in_bf16_the_gradients_are_the_float64_ones_to_bf16_precision(chunk):
    generator = torch.Generator().manual_seed(0)
    hidden64 = torch.randn(2, 9, 16, dtype=torch.float64, generator=generator)
    weight64 = torch.randn(40, 16, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 40, (2, 9), generator=generator)
    exact = torch.autograd.grad(plain_loss(hidden64.requires_grad_(), weight64.requires_grad_(), labels), (hidden64, weight64))
    hidden = hidden64.detach().bfloat16().requires_grad_()
    weight = weight64.detach().bfloat16().requires_grad_()
    got = torch.autograd.grad(causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk), (hidden, weight))
    for g, e in zip(got, exact):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), e, rtol=2e-2, atol=2e-3)
