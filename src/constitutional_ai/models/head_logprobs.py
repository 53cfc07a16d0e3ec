"""An LM head and the log-probabilities of chosen tokens in one pass, in chunks of rows.

PPO needs, per response token, ``log softmax(logits / T)[token]`` (and the entropy, logged): the
logits themselves are a means. Computed by the model, a minibatch's logits are one tensor of 8 x 32
x 32k floats, exactly 32 MiB, and the log-softmax, gather and their backward make four or five more
of that size, each over glibc's ``mmap`` ceiling and page-faulted in afresh
(:mod:`~constitutional_ai.models.cpu_heap`). Here the head runs over a chunk of rows at a time
(on a CPU, each chunk's logits at most :data:`~constitutional_ai.models.cpu_heap.HEAP_BLOCK_BYTES`,
:func:`chunk_rows`); a chunk's
logits turn into its probabilities in place (the only thing the backward pass needs), and the
backward turns those into the logits' gradient in place and multiplies it straight into the
hidden states' and the head's gradients (the latter into a kept gradient, :mod:`kept_grads`). The
numbers are the same sums over each row, up to float rounding.

Used where :func:`~constitutional_ai.models.head_split.base_and_head` finds the model's logits are
exactly its head over its base model's states.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from constitutional_ai.models.cpu_heap import HEAP_BLOCK_BYTES
from constitutional_ai.models.kept_grads import add_product

#: Chunks have at least this many rows: each chunk reads the whole head weight (545 MB at Qwen2.5's
#: 151,936-token vocabulary), and a product of fewer rows is bound by that read, not by the
#: arithmetic (27-row chunks made a minibatch's head 1.5x slower there).
MIN_CHUNK_ROWS = 128


def chunk_rows(weight: torch.Tensor, rows: int) -> int:
    """Rows per chunk for a head ``weight`` over ``rows`` rows. On a CPU in fp32: logits of at most
    :data:`HEAP_BLOCK_BYTES` a chunk (128 rows at a 32k vocabulary), and no fewer than
    :data:`MIN_CHUNK_ROWS`. Elsewhere one chunk: a GPU's caching allocator reuses its blocks, its
    products want many rows, and a 16-bit weight gradient summed over chunks would round at each."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return max(1, rows)
    return max(MIN_CHUNK_ROWS, HEAP_BLOCK_BYTES // (4 * weight.shape[0]))


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                tokens: torch.Tensor, temperature: float, entropy: bool,
                grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = chunk_rows(weight, hidden.shape[0])
        logprobs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        entropies = torch.empty_like(logprobs) if entropy else logprobs.new_empty(0)
        probs = []
        for start in range(0, hidden.shape[0], rows):
            end = start + rows
            z = F.linear(hidden[start:end], weight, bias).float()  # fp32 logits: a new chunk either way
            if temperature != 1.0:
                z.div_(temperature)
            lse = torch.logsumexp(z, dim=-1)
            logprobs[start:end] = z.gather(1, tokens[start:end, None]).squeeze(1) - lse
            if entropy:  # H = -sum p log p, from log p in place of the logits
                logp = z.sub_(lse[:, None])
                p = logp.exp()
                entropies[start:end] = -torch.bmm(p[:, None], logp[:, :, None]).reshape(-1)
            elif grad:
                p = z.sub_(lse[:, None]).exp_()
            if grad:
                probs.append(p)
        ctx.mark_non_differentiable(entropies)
        if grad:
            ctx.save_for_backward(hidden, weight, tokens)
            ctx.probs, ctx.temperature, ctx.rows, ctx.has_bias = probs, temperature, rows, bias is not None
        return logprobs, entropies

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.probs is None:  # they became the first backward's gradient
            raise RuntimeError("head_logprobs' backward runs once (its probabilities turn into the gradient in "
                               "place); run the forward again to differentiate again")
        hidden, weight, tokens = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = grad_b = None
        for i, p in enumerate(ctx.probs):
            start = i * ctx.rows
            g = grad[start:start + ctx.rows].float()
            # d logprob / d logit = onehot(token) - p, over the temperature: in place in p
            p.mul_(-g[:, None]).scatter_add_(1, tokens[start:start + ctx.rows, None], g[:, None])
            if ctx.temperature != 1.0:
                p.div_(ctx.temperature)
            d = p.to(weight.dtype)
            h = hidden[start:start + ctx.rows].to(weight.dtype)  # bf16 states of an fp32 head under autocast
            if need_h:
                grad_h[start:start + ctx.rows] = d @ weight
            if need_w and not add_product(weight, d.t(), h):
                grad_w = d.t() @ h if grad_w is None else grad_w.addmm_(d.t(), h)
            if need_b and ctx.has_bias:
                grad_b = d.sum(0) if grad_b is None else grad_b.add_(d.sum(0))
        ctx.probs = None
        return grad_h, grad_w, grad_b, None, None, None, None


def head_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, tokens: torch.Tensor, temperature: float = 1.0,
                  entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(head(hidden) / temperature)[tokens]`` per position (``hidden``: ``[..., H]``,
    ``tokens``: ``[...]``), fp32, differentiable in ``hidden`` and the head; and, when asked, each
    position's entropy (logged only: no gradient)."""
    flat = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    # a pass with autograd off (a rollout) keeps nothing for a backward pass: one chunk at a time
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (flat, head.weight, head.bias))
    logprobs, entropies = _HeadLogprobs.apply(flat, head.weight, head.bias, tokens.reshape(-1),
                                              float(temperature), entropy, grad)
    return logprobs.view(tokens.shape), entropies.view(tokens.shape) if entropy else None
