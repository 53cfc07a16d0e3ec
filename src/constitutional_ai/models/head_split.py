"""A causal LM split into its base model and its LM head, where that split is exact.

Computing the head ourselves lets a caller run it over just the positions it reads, in chunks
(:mod:`head_logprobs`, the labeler's deferred head), instead of the model's one logits tensor. It is
only right where the model's logits are exactly its head over its base model's last hidden
states: Gemma 2 soft-caps them, Cohere and Granite scale them after the head, a PEFT wrapper is
not the model, and those keep their own forward.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def base_and_head(model: Any) -> tuple[Any, torch.nn.Linear] | None:
    """``(base model, LM head)`` when ``model``'s logits equal its head applied to its base model's
    last hidden states, bit for bit on a short probe; else None. Checked once per call: keep the
    answer (the probe is a forward pass over 7 tokens)."""
    try:
        base = getattr(model, model.base_model_prefix)
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear) or "logits_to_keep" not in inspect.signature(
                model.forward).parameters:
            return None
        device = head.weight.device
        ids = (torch.arange(7, device=device)[None] * 7919 + 3) % int(head.weight.shape[0])
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=3).logits
            mine = head(base(input_ids=ids, use_cache=False)[0][:, -3:])
        return (base, head) if torch.equal(logits, mine) else None
    except Exception:  # any model this probe cannot split keeps its own forward
        return None
