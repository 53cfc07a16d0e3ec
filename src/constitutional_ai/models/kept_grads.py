"""The largest gradients, kept between a CPU trainer's backward passes and written in place.

A backward pass normally allocates each parameter's gradient afresh, and the optimizer's
``zero_grad(set_to_none=True)`` frees it again. At a 32k vocabulary and hidden size 896 an
embedding's gradient is a 117 MB matrix of zeros with the batch's rows scattered in: over glibc's
``mmap`` ceiling (:mod:`~constitutional_ai.models.cpu_heap`), so page-faulted in on every
minibatch, 34 ms against 8 ms for zeroing a kept matrix and adding the rows into it (two cores).
PPO's policy and value model each have one, and a tied LM head's gradient is a second such matrix.

Here those gradients stay allocated across passes: the embedding returns its rows as a sparse
gradient, which autograd adds into the kept dense one in place (``nn.Embedding(sparse=True)``);
a tied head adds its product into it (:func:`add_product`). Between passes the gradients exist
anyway (the optimizer steps on them); at the peak, one 117 MB matrix fewer is alive, since the
embedding's rows are no longer a second dense matrix summed into the head's.

Only on a CPU and in one process: a DDP wrapper reduces a gradient when autograd accumulates it,
and a product written past autograd would not be in that reduction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from constitutional_ai.models.cpu_heap import HEAP_BLOCK_BYTES

#: Set on a parameter while its gradient is kept (:meth:`KeptGrads.active`).
KEPT = "_cai_kept_grad"


def add_product(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """``weight.grad += a @ b`` in place when ``weight``'s gradient is kept; False (nothing done) when
    it is not, and the caller returns the product to autograd as usual."""
    grad = weight.grad
    if not getattr(weight, KEPT, False) or grad is None or grad.layout != torch.strided:
        return False
    grad.addmm_(a.to(grad.dtype), b.to(grad.dtype))
    return True


class KeptGrads:
    """The trained embedding matrices of ``modules`` at least twice :data:`HEAP_BLOCK_BYTES`
    (glibc's ``mmap`` ceiling), whose gradients are kept while :meth:`active`. Smaller ones come from
    the heap and are reused anyway; an embedding with ``max_norm`` or ``scale_grad_by_freq`` is left
    alone."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.embeddings = [m for module in modules for m in module.modules()
                           if type(m) is torch.nn.Embedding and m.weight.requires_grad and not m.sparse
                           and m.max_norm is None and not m.scale_grad_by_freq
                           and m.weight.numel() * m.weight.element_size() >= 2 * HEAP_BLOCK_BYTES]
        self.weights = list({id(m.weight): m.weight for m in self.embeddings}.values())

    def __bool__(self) -> bool:
        return bool(self.weights)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, the embeddings return sparse gradients into kept dense ones. Forward and
        backward passes both run inside it (a forward records whether its gradient is sparse); the
        gradients are dense again on the way out, for anyone else's optimizer. Only a trainer's own
        ``.backward()`` passes belong inside: ``torch.autograd.grad`` there would also see a tied head's
        product added into ``.grad``, and a copy of the model taken inside keeps sparse embeddings."""
        for m in self.embeddings:
            m.sparse = True
        for w in self.weights:
            setattr(w, KEPT, True)
        try:
            yield
        finally:
            for m in self.embeddings:
                m.sparse = False
            for w in self.weights:
                with contextlib.suppress(AttributeError):
                    delattr(w, KEPT)

    def zero_grad(self, optimizer: Any) -> None:
        """``optimizer.zero_grad(set_to_none=True)``, except that a kept gradient is zeroed in place
        (made the first time), so that a sparse gradient always lands in a dense one."""
        if not self.weights:
            optimizer.zero_grad(set_to_none=True)
            return
        kept = {id(w) for w in self.weights}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in kept:
                    p.grad = None
                elif p.grad is None or p.grad.layout != torch.strided:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad.zero_()
