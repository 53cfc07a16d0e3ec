"""Render the critique and revision requests of a constitution as model prompts.

Two renderings of the same content: the paper's raw format (``CritiqueRequest:``/``Critique:``
blocks after a ``Human:/Assistant:`` dialogue) for base models, and chat messages (the requests
as user turns, the critique and revision as assistant turns) for models with a chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from constitutional_ai.common.chat_format import render_raw
from constitutional_ai.common.types import Conversation, Prompt, Style
from constitutional_ai.constitution.model import CritiqueExample


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def as_messages(messages: Sequence[Any]) -> Conversation:
    """Plain ``{role, content}`` dicts from dicts or :class:`Message` objects."""
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]


@dataclass(frozen=True)
class CritiqueStep:
    """What a critique/revision round has produced so far, enough to render the next request."""

    critique_request: str
    revision_request: str
    critique: str | None = None


class CritiquePromptBuilder:
    """Builds the critique and revision prompts for one conversation and its current response.

    Each round sees the original conversation with the latest response as the assistant turn, not
    the whole history of earlier rounds, so prompt length stays bounded however many rounds run.
    """

    def __init__(self, style: Style, examples: Sequence[CritiqueExample] = ()):
        self.style = style
        self.examples = list(examples)
        self._raw_prefix = "".join(self.raw_example(e) for e in self.examples)
        self._chat_prefix: Conversation = [m for e in self.examples for m in self._chat_example(e)]

    @property
    def raw_prefix(self) -> str:
        """The few-shot block every raw-format request starts with (after any system prompt)."""
        return self._raw_prefix

    # -- few-shot -------------------------------------------------------------------------------
    @staticmethod
    def raw_example(e: CritiqueExample) -> str:
        """One worked example in the paper's raw format."""
        return (render_raw(e.messages, add_generation_prompt=False)
                + f"\n\nCritiqueRequest: {e.critique_request}\n\nCritique: {e.critique}"
                + f"\n\nRevisionRequest: {e.revision_request}\n\nRevision: {e.revision}")

    @staticmethod
    def _chat_example(e: CritiqueExample) -> Conversation:
        return [*as_messages(e.messages), _msg("user", e.critique_request), _msg("assistant", e.critique),
                _msg("user", e.revision_request), _msg("assistant", e.revision)]

    # -- requests -------------------------------------------------------------------------------
    def _dialogue(self, conversation: Conversation, response: str) -> tuple[Conversation, Conversation]:
        """``(system messages, few-shot + dialogue with the response)``: a conversation's system
        prompt stays first, ahead of the few-shot examples, where chat templates require it."""
        system = [m for m in conversation if m["role"] == "system"]
        rest = [m for m in conversation if m["role"] != "system"]
        return system, [*rest, _msg("assistant", response)]

    def _raw_head(self, conversation: Conversation, response: str) -> str:
        system, dialogue = self._dialogue(conversation, response)
        preamble = "\n\n".join(m["content"].strip() for m in system)
        return preamble + self._raw_prefix + render_raw(dialogue, add_generation_prompt=False)

    def critique(self, conversation: Conversation, response: str, step: CritiqueStep) -> Prompt:
        if self.style == "raw":
            return (self._raw_head(conversation, response)
                    + f"\n\nCritiqueRequest: {step.critique_request}\n\nCritique:")
        system, dialogue = self._dialogue(conversation, response)
        return [*system, *self._chat_prefix, *dialogue, _msg("user", step.critique_request)]

    def revision(self, conversation: Conversation, response: str, step: CritiqueStep) -> Prompt:
        """The revision prompt; without a critique (the ablation) it asks for the revision directly."""
        if self.style == "raw":
            text = self._raw_head(conversation, response)
            if step.critique is not None:
                text += f"\n\nCritiqueRequest: {step.critique_request}\n\nCritique: {step.critique}"
            return text + f"\n\nRevisionRequest: {step.revision_request}\n\nRevision:"
        system, dialogue = self._dialogue(conversation, response)
        messages = [*system, *self._chat_prefix, *dialogue]
        if step.critique is not None:
            messages += [_msg("user", step.critique_request), _msg("assistant", step.critique)]
        return [*messages, _msg("user", step.revision_request)]
