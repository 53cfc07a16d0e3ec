"""Small-batch linear layers on a CPU, computed the way the CPU's BLAS runs fastest.

``torch.nn.functional.linear(x, W)`` asks the BLAS for ``x @ W.T``. Decoding feeds it a handful of
rows (one per sequence in the batch) against a wide weight, and on the MKL build PyTorch ships for
x86 that orientation is slow at small row counts: on the 2-core CI machine a 32k-vocabulary LM head
(896 x 32768, fp32) took 22.1 ms for 16 rows as ``linear`` and 13.0 ms as ``(W @ x.T).T``, the MLP's
896 x 4864 projection 1.98 against 1.28 ms; at one row both run the same matrix-vector kernel, and
from a few hundred rows (prefill, training) ``linear`` is as fast or faster. Decoding a batch of
critiques spends most of its time in those products, so the generation backend computes a linear
layer as ``W @ x.T`` when it has few rows and many outputs, and as ``linear`` otherwise. The values
are the same products summed in another order (differences at float rounding, as between batch
sizes).

Installed on a model the backend loaded for inference, and by PPO on the policy (for its rollouts) and
the reference; only on CPU, and it acts only where autograd is off (``torch.inference_mode`` or
``no_grad``): a training pass runs ``linear`` as it always did.
"""

from __future__ import annotations

from typing import Any

import torch

#: At most this many rows (tokens in the batch) take the transposed product...
MAX_ROWS = 64
#: ...and only for layers with at least this many outputs (narrow K/V projections gain nothing).
MIN_OUT = 512


def _forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if (x.device.type != "cpu" or rows == 0 or rows > MAX_ROWS or weight.shape[0] < MIN_OUT
            or torch.is_grad_enabled() or x.dtype != weight.dtype):
        if x.dim() > 2 and not x.is_contiguous() and not torch.is_grad_enabled():
            # a sliced 3-D input (the last positions an LM head keeps) would go to a batched product
            # with the weight expanded per row: 360 ms against 250 for 16 x 33 rows of a 32k head
            x = x.contiguous()
        return torch.nn.functional.linear(x, weight, module.bias)
    flat = x.reshape(rows, x.shape[-1])
    out = torch.mm(weight, flat.t()).t().contiguous()
    if module.bias is not None:
        out += module.bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def install(model: Any) -> int:
    """Route the model's linear layers through the small-batch rule; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and not getattr(module, "_cai_small_batch", False):
            module.forward = _forward.__get__(module)
            module._cai_small_batch = True
            changed += 1
    return changed
