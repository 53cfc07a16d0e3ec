"""Cleaning a model's completion the same way wherever it is read (critique, pairs, evaluation)."""

from __future__ import annotations

import re

from constitutional_ai.common.chat_format import BLOCK_LABELS

_LEADING_LABEL = re.compile(r"^\s*(?:" + "|".join(BLOCK_LABELS) + r")\s*:\s*", re.IGNORECASE)
_NEXT_TURN = re.compile(r"\n+(?:" + "|".join(BLOCK_LABELS) + r"):")


def clean_completion(text: str, style: str = "raw") -> str:
    """Strip an echoed label (``Revision: ...``) and, in the raw format, cut where the model starts
    the next block (``\\nHuman:``, ``\\nCritiqueRequest:``...). Chat models end their turn with a
    token instead, so their text is never cut: a reply may legitimately quote such a label."""
    text = _LEADING_LABEL.sub("", text, count=1)
    if style == "raw":
        match = _NEXT_TURN.search(text)
        if match:
            text = text[:match.start()]
    return text.strip()
