"""The paper's raw dialogue format, ``\\n\\nHuman: ...\\n\\nAssistant: ...``, both ways.

Base models without a chat template see conversations in this format (as the paper's models did),
and the paper's published files and hh-rlhf transcripts are written in it. Keeping the rendering
and the parsing side by side guarantees they round-trip.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

ASSISTANT = "\n\nAssistant:"

#: Labels that start a new block in the paper's critique/revision and dialogue format.
BLOCK_LABELS = ("Human", "Assistant", "CritiqueRequest", "Critique", "RevisionRequest", "Revision")
_BLOCK_RE = re.compile(r"\n\n(" + "|".join(BLOCK_LABELS) + r"):")
_ROLE_OF = {"Human": "user", "Assistant": "assistant"}
_LABEL_OF = {"user": "Human", "assistant": "Assistant", "system": "System"}

#: Stop sequences for generation in the raw format: any new block means the turn is over.
RAW_STOP = ["\n\nHuman:", "\n\nAssistant:", "\n\nCritiqueRequest:", "\n\nRevisionRequest:",
            "\n\nCritique:", "\n\nRevision:"]


def _get(message: Any, key: str) -> str:
    return message[key] if isinstance(message, dict) else getattr(message, key)


def render_raw(messages: Sequence[Any], add_generation_prompt: bool = True) -> str:
    """Render ``{role, content}`` messages in the paper's format.

    A system message becomes a plain preamble. With ``add_generation_prompt`` the text ends with
    ``\\n\\nAssistant:`` so that the model continues as the assistant.
    """
    parts = []
    for message in messages:
        role, content = _get(message, "role"), _get(message, "content")
        if role == "system":
            parts.append(content.strip())
        else:
            parts.append(f"\n\n{_LABEL_OF[role]}: {content.strip()}")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def split_blocks(text: str) -> list[tuple[str, str]]:
    """Split raw text into ``(label, content)`` blocks; text before the first label is dropped."""
    pieces = _BLOCK_RE.split(text)
    return [(pieces[i], pieces[i + 1].strip()) for i in range(1, len(pieces) - 1, 2)]


def parse_raw(text: str) -> list[dict[str, str]]:
    """Parse a ``Human:/Assistant:`` transcript into messages.

    Empty trailing turns (``...\\n\\nAssistant:`` at the end of a prompt) are dropped, so a
    prompt parses to a conversation ending with the human turn.
    """
    messages = []
    for label, content in split_blocks(text if text.startswith("\n\n") else "\n\n" + text):
        if label not in _ROLE_OF:
            continue
        messages.append({"role": _ROLE_OF[label], "content": content})
    while messages and not messages[-1]["content"]:
        messages.pop()
    return messages
