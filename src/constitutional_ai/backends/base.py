"""The backend protocol: the only way a stage talks to a language model for text.

It is deliberately small (format, count, generate, score) so that an in-process transformers
model, a vLLM engine, an OpenAI-compatible server or a Ray pool of any of them can stand behind
it unchanged. Stages never import transformers for generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from constitutional_ai.common.types import Prompt
from constitutional_ai.config import GenerationParams

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Generation:
    """One completion. ``finish_reason`` is ``stop`` for an end-of-sequence token or stop string."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found. Every backend cuts here: an
    engine may stop after the string, or return it, and records must not depend on which."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@runtime_checkable
class LanguageModel(Protocol):
    """What every backend provides.

    A prompt is either raw text (sent verbatim, the paper's format) or a list of ``{role,
    content}`` messages (rendered with the chat template when ``style == "chat"``, else in the
    paper's ``Human:/Assistant:`` format).
    """

    model_id: str
    #: "chat" when conversations are rendered with a chat template, "raw" for the paper's format.
    style: Literal["raw", "chat"]
    #: Maximum prompt + completion tokens the model accepts.
    context_length: int

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        """Prompt lengths in tokens, after formatting, so stages can skip over-long inputs early."""
        ...

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams,
                 seeds: Sequence[int] | None = None) -> list[Generation]:
        """Complete every prompt; the backend batches as it sees fit and keeps the input order.

        ``seeds`` gives each prompt its own sampling seed (as vLLM's and OpenAI's per-request
        ``seed``): a backend should make a prompt's sample depend on its seed alone, so that
        batching and resuming cannot change the data.
        """
        ...

    def score_choices(self, prompts: Sequence[Prompt],
                      choices: Sequence[Sequence[str]]) -> list[list[float]]:
        """Sum of token log-probabilities of each continuation in ``choices[i]`` after ``prompts[i]``.

        The feedback model's label is a comparison of these numbers; no text is generated.
        """
        ...

    def close(self) -> None:
        """Release the model (GPU memory, server connections)."""
        ...
