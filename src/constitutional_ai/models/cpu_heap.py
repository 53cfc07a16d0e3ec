"""The block size CPU passes keep their large tensors under, for glibc's allocator.

glibc serves a block of 32 MiB or more (its ``mmap`` ceiling on 64-bit Linux) with a fresh
``mmap`` and unmaps it when freed, so a tensor that size is page-faulted in afresh every time it is
made: at Qwen2.5-0.5B's shape a scoring pass's MLP activations, a PPO minibatch's logits (8 x 32 x
32k floats: exactly 32 MiB) and each 117 MB embedding gradient cost 2 microseconds a 4 KB page, 13-15%
of a PPO update on two cores. Smaller blocks come from the heap, which keeps and reuses them.
Telling glibc to keep everything (``mallopt``) is process-wide and grew peak memory 9-16%; the
passes here size their tensors instead, and the largest gradients are kept (:mod:`kept_grads`).
"""

from __future__ import annotations

#: Half of glibc's ``mmap`` ceiling: room for the heap to hold a pass's blocks side by side.
HEAP_BLOCK_BYTES = 16 * 2**20
