"""A lean output head: the LM head's linear layer and the cross-entropy loss in chunks of tokens, so
the full ``tokens × vocabulary`` logits never exist.

In a plain causal-LM step the logits are the largest activation: ``tokens × 32000`` values, upcast to
fp32 for the loss, with the softmax kept for backward and a gradient of the same size made from it. A
loss is a scalar, so its gradients can be computed on the way forward: :func:`causal_lm_loss` takes
one chunk of tokens at a time, computes its logits, its part of the loss, and the gradients of that part
with respect to the hidden states and the head's weight (the softmax turned into the gradient in place),
and keeps only those gradients: ``tokens × hidden`` and ``vocabulary × hidden`` instead of several
``tokens × vocabulary``. Backward then only scales them. The loss and gradients are those of
``transformers``' ``ForCausalLMLoss`` (mean over the predicted tokens, logits upcast to fp32).

:func:`use_lean_head` switches a ``LlamaForCausalLM``-style model (``model.model`` the decoder,
``model.lm_head`` the head) to it; the model's own ``forward`` is replaced on the instance, so DDP and
FSDP2's hooks, which run around ``model(...)``, still see every call.

>>> import torch
>>> hidden, weight = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
>>> labels = torch.randint(0, 11, (2, 5))
>>> plain = torch.nn.functional.cross_entropy((hidden[:, :-1] @ weight.T).reshape(-1, 11), labels[:, 1:].reshape(-1))
>>> torch.allclose(causal_lm_loss(hidden, weight, labels, chunk_tokens=3), plain)
True
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, num_items_in_batch=None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` against ``labels`` shifted by one, in chunks.

    Args:
        hidden: ``(batch, seq, d)`` final hidden states.
        weight: ``(vocab, d)`` the head's weight (no bias: LLaMA's head has none).
        labels: ``(batch, seq)`` token ids; position ``t`` is predicted from ``hidden[:, t - 1]``;
            ``-100`` marks positions left out of the loss.
        chunk_tokens: tokens per chunk; the peak extra memory is ``chunk_tokens × vocab`` fp32 values.
        num_items_in_batch: divide the summed loss by this instead of this batch's target count, as
            ``ForCausalLMLoss`` does when ``Trainer`` accumulates gradients (the targets of the whole
            accumulation window).
    """
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int; got chunk_tokens={chunk_tokens!r}")
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(states, weight, targets, chunk_tokens, num_items_in_batch)
    loss, _, _ = _loss_and_grads(states, weight, targets, chunk_tokens, num_items_in_batch, with_grads=False)
    return loss


def _loss_and_grads(states, weight, targets, chunk_tokens: int, num_items_in_batch, with_grads: bool):
    exact = torch.promote_types(weight.dtype, torch.float32)  # fp32 as the plain path's upcast, fp64 stays fp64
    if num_items_in_batch is None:
        denominator = (targets != IGNORE_INDEX).sum().clamp(min=1).to(exact)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=states.device).to(exact)
    total = torch.zeros((), dtype=exact, device=states.device)
    grad_states = torch.empty_like(states) if with_grads else None
    # several chunks' head gradients are summed in fp32 (or fp64); one chunk's is made in the weight's
    # dtype directly, as the plain path makes it, without a vocabulary x hidden fp32 buffer
    one_chunk = states.shape[0] <= chunk_tokens
    grad_weight = None
    if with_grads and not one_chunk:
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device)
    for start in range(0, states.shape[0], chunk_tokens):
        rows, target = states[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        logits = F.linear(rows, weight).to(exact)  # in the model's dtype, then upcast: as the plain path
        kept = target != IGNORE_INDEX
        safe = torch.where(kept, target, 0)
        picked = logits.gather(1, safe[:, None]).squeeze(1)
        log_norm = _log_normaliser_then_softmax_(logits)
        total += ((log_norm - picked) * kept).sum()
        if with_grads:  # d(mean CE)/d logits = (softmax - onehot) / count, built in the logits' memory
            grad = logits
            grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1
            grad.mul_((kept / denominator)[:, None])
            grad_in_weight_dtype = grad.to(weight.dtype)  # a copy below fp32: made once per chunk
            grad_states[start:start + chunk_tokens] = grad_in_weight_dtype @ weight
            if one_chunk:
                grad_weight = grad_in_weight_dtype.t() @ rows
            else:
                grad_weight.addmm_(grad.t(), rows.to(exact))
            del grad, grad_in_weight_dtype
        del logits  # before the next chunk's logits exist, not after
    return total / denominator, grad_states, grad_weight


def _log_normaliser_then_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Each row's log-sum-exp; ``logits`` is turned into its softmax in place.

    Eager, the normaliser is made in the logits' own memory: ``torch.logsumexp`` makes a temporary as large
    as the logits (the first touch of its fresh pages cost about 5% of a LLaMA-130M step on CPU). Compiled,
    ``logsumexp`` is one fused reduction with no temporary, where the in-place chain made the compiled
    graph keep extra logits-sized buffers (measured).
    """
    if torch.compiler.is_compiling():
        log_norm = torch.logsumexp(logits, dim=-1)
        logits.sub_(log_norm[:, None]).exp_()
        return log_norm
    peak = logits.amax(dim=-1, keepdim=True)
    sums = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
    logits.div_(sums)
    return (peak + sums.log()).squeeze(1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward scales them by the incoming
    gradient of the loss (a scalar), in place, and hands them on.

    The gradients are kept on ``ctx`` rather than through ``save_for_backward`` so that backward can
    drop its own reference: the tensor it returns is then autograd's alone, and becomes the head's
    ``.grad`` without a copy (with ``save_for_backward`` the node would hold it until backward ends, so
    a second ``vocabulary × hidden`` tensor would exist while the head's gradient is accumulated). Neither
    tensor has a ``grad_fn``, so holding them on ``ctx`` makes no reference cycle.
    """

    @staticmethod
    def forward(ctx, states, weight, targets, chunk_tokens: int, num_items_in_batch):
        loss, grad_states, grad_weight = _loss_and_grads(states, weight, targets, chunk_tokens, num_items_in_batch,
                                                         with_grads=True)
        ctx.grads = (grad_states, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("the lean head's backward runs once per forward: its gradients were handed on the "
                               "first time (a second backward with retain_graph=True is not supported)")
        grad_states, grad_weight = ctx.grads
        ctx.grads = None  # handed on, not kept
        scale = grad_loss.to(grad_states.dtype)
        return grad_states.mul_(scale), grad_weight.mul_(scale), None, None, None


def use_lean_head(model: torch.nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.nn.Module:
    """Make ``model(input_ids=..., labels=...)`` compute its loss with :func:`causal_lm_loss`.

    ``model`` is a transformers causal LM with ``model.model`` (the decoder, returning
    ``last_hidden_state``) and a bias-free, dense ``model.lm_head``. The output has ``loss`` and no
    ``logits`` (calls without ``labels`` get the original forward, logits and all). ``num_items_in_batch``
    (passed by ``Trainer`` when it accumulates gradients) divides the summed loss, as in transformers' own
    loss. Returns ``model``.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or not hasattr(model, "model"):
        raise ValueError(f"use_lean_head needs a causal LM with .model and a bias-free nn.Linear .lm_head; got "
                         f"{type(model).__name__} with lm_head={head!r}")
    if torch.nn.utils.parametrize.is_parametrized(head, "weight"):
        # the chunked loss computes the head's gradient itself; a structured weight would not pass it on
        raise ValueError("use_lean_head needs a dense lm_head, and this model's lm_head is parametrized: leave "
                         "it out of parametrize's target_modules, or keep the model's own head")
    plain = model.forward

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return plain(input_ids=input_ids, **kwargs)
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        loss = causal_lm_loss(hidden, self.lm_head.weight, labels, chunk_tokens, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    return model
