"""A tied LM head whose weight gradient lands where the embedding's can be added to it in place.

With tied word embeddings (Qwen2.5-0.5B, the tiny models) one matrix gets two gradients in each
backward pass: the LM head's, a dense vocabulary x hidden product, and the input embedding's, a
scatter of the token rows into a zero-filled matrix of the same size. Autograd sums the two before
the optimizer sees them, in place when one is a plain tensor nothing else holds. ``nn.Linear``'s
weight gradient reaches the sum as a transposed view of its product (``linear`` multiplies by
``weight.T``), and then the engine allocates a third matrix for the sum. At a 32k vocabulary and
hidden size 896 that is a fresh 117 MB, page-faulted on every minibatch: 60 ms of the 14.7 s PPO
update on two cores, times eight minibatches, and one more matrix of that size alive at the peak.
Computing the head's weight gradient as one plain product (``grad.T @ x``, contiguous) lets autograd
sum the two in place, into the embedding's. The numbers are the same products (the same BLAS call
``linear``'s backward makes).

Installed by PPO on its policy; it acts only when autograd records the head and the weight is
trained and tied, so inference, frozen embeddings (LoRA) and untied heads run as before.
"""

from __future__ import annotations

from typing import Any

import torch

from constitutional_ai.models.kept_grads import add_product


class _TiedHeadLinear(torch.autograd.Function):
    """``linear(x, weight, bias)`` with a contiguous, unshared weight gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        rows = x.reshape(-1, x.shape[-1])
        grad_w = None  # with a kept gradient, the product is added into it instead (add_product)
        if ctx.needs_input_grad[1] and not add_product(weight, flat.t(), rows):
            grad_w = flat.t().mm(rows)
        grad_b = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def install(model: Any) -> bool:
    """Route a tied ``nn.Linear`` LM head's training passes through :class:`_TiedHeadLinear`;
    returns whether the model has such a head (an untied or custom head is left alone)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if (not isinstance(head, torch.nn.Linear) or embeddings is None
            or head.weight is not getattr(embeddings, "weight", None)):
        return False
    if getattr(head, "_cai_tied_head", False):
        return True
    inner = head.forward  # the plain or the small-batch (cpu_linear) forward, kept for inference

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and head.weight.requires_grad:
            return _TiedHeadLinear.apply(x, head.weight, head.bias)
        return inner(x)

    head.forward = forward
    head._cai_tied_head = True
    return True
