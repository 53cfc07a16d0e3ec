"""The feedback model's multiple-choice question (Bai et al. 2022, section 4.1).

    Consider the following conversation between a human (H) and an assistant (A):
    H: ...  A: ...
    <comparison principle>
    Options:
     (A) [[[response one]]]
     (B) [[[response two]]]
    The answer is: (A|B)

Direct RLAIF (Lee et al. 2023) asks the same feedback model to rate one response instead:

    Consider the following conversation between a human (H) and an assistant (A):
    H: ...  A: ...
    The assistant's final response:
    [[[response]]]
    Rate the assistant's final response from 1 (worst) to 10 (best) by this standard: <principle>
    Rating: (1..10)/10

Responses sit inside ``[[[ ]]]`` delimiters with any delimiter or turn marker inside them
defanged, so text in a response (``(B)``, ``The answer is``, a fake options block, an instruction
to the judge) cannot change which option a letter refers to. The inner conversation uses
``H:``/``A:`` labels so that it cannot be read as turns of the outer dialogue.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from constitutional_ai.common.chat_format import render_raw
from constitutional_ai.common.types import Conversation, Prompt
from constitutional_ai.constitution.model import ComparisonPrinciple, FeedbackExample
from constitutional_ai.constitution.prompts import as_messages

INTRO = "Consider the following conversation between a human (H) and an assistant (A):"
ANSWER = "The answer is:"
THINK = "Let's think step by step:"
CHAT_THINK = "\n\nLet's think step by step, then give the answer."
LETTERS = ("A", "B")
RATING_RESPONSE = "The assistant's final response:"
RATING_INSTRUCTION = "Rate the assistant's final response from 1 (worst) to 10 (best) by this standard:"
RATING_CUE = "Rating:"
#: The rating scale, lowest first: the order of a rating question's choices.
RATINGS = tuple(range(1, 11))
#: Written after every rating: without it `` 1`` is a prefix of `` 10`` (digits are separate tokens
#: in most tokenizers), so P(`` 1``) would hold all of P(`` 10``) and the ten choices would not be
#: disjoint events; with it, ``1/10`` and ``10/10`` part at the token after ``1``.
RATING_SUFFIX = "/10"
#: Runs of two or more square brackets (after NFKC has folded full-width ones): near-miss delimiters.
_BRACKET_RUN = re.compile(r"\[{2,}|\]{2,}")
#: A role label opening a line (``H:``, ``Human:``, ``Assistant :``...): a forged turn.
_ROLE_LABEL = re.compile(r"(?im)^([ \t]*)(human|assistant|system|user|h|a)([ \t]*):")
#: The answer cue: only the question itself may say it.
_ANSWER_CUE = re.compile(r"the\s+answer\s+is\s*:?", re.IGNORECASE)


def defang(text: str, special_tokens: Sequence[str] = ()) -> str:
    """Make a response (or a turn of the judged conversation) unable to act as structure of the
    question around it. Each rule closes one way out:

    - NFKC folding first, so full-width ``［［［`` and other look-alikes meet the rules below;
    - ``\r\n`` and ``\r`` become ``\n``, and blank lines collapse: turns are separated by a blank
      line, so no text inside a turn can start a turn (``\r\n\r\nHuman:``, ``\n\nH:``);
    - a role label at the start of a line loses its colon (``H: ...`` becomes ``H - ...``);
    - a run of brackets is spaced out (``[[``, ``]]]``), and a bracket at either end is kept off
      the delimiter, so ``...]`` never meets ``]]]`` as ``]]]]``;
    - ``The answer is:`` becomes ``the answer would be``: only the question gives the cue;
    - the model's special tokens (chat-template markers such as ``<|im_start|>``) are split.

    Idempotent, so defanging twice changes nothing.
    """
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"\n[ \t]*(?:\n[ \t]*)+", "\n", text)
    text = _ROLE_LABEL.sub(lambda m: f"{m.group(1)}{m.group(2)} -", text)
    text = _BRACKET_RUN.sub(lambda m: " ".join(m.group(0)), text)
    text = _ANSWER_CUE.sub("the answer would be", text)
    for token in special_tokens:
        if len(token) > 1:
            text = text.replace(token, f"{token[0]} {token[1:]}")
    text = text.strip()
    if text.startswith("["):
        text = " " + text
    if text.endswith("]"):
        text += " "
    return text


def render_inner(conversation: Conversation, special_tokens: Sequence[str] = ()) -> str:
    labels = {"user": "H", "assistant": "A", "system": "System"}
    return "\n\n".join(f"{labels[m['role']]}: {defang(m['content'], special_tokens)}" for m in conversation)


def question(conversation: Conversation, principle: str, option_a: str, option_b: str,
             special_tokens: Sequence[str] = ()) -> str:
    a, b = defang(option_a, special_tokens), defang(option_b, special_tokens)
    return (f"{INTRO}\n\n{render_inner(conversation, special_tokens)}\n\n{principle.strip()}\nOptions:\n"
            f" (A) [[[{a}]]]\n (B) [[[{b}]]]")


def rating_question(conversation: Conversation, principle: str, response: str,
                    special_tokens: Sequence[str] = ()) -> str:
    """The question that rates one response; the principle is a comparison principle, read as the
    standard the rating is given by."""
    return (f"{INTRO}\n\n{render_inner(conversation, special_tokens)}\n\n{RATING_RESPONSE}\n"
            f"[[[{defang(response, special_tokens)}]]]\n\n{RATING_INSTRUCTION} {principle.strip()}")


@dataclass(frozen=True)
class RatingQuestion:
    """One scored rating question: the prompt and one continuation per rating in :data:`RATINGS`."""

    prompt: Prompt
    choices: tuple[str, ...]


@dataclass(frozen=True)
class FeedbackQuestion:
    """One scored question: the prompt and the two answer continuations, A first."""

    prompt: Prompt
    choices: tuple[str, str]


class FeedbackPromptBuilder:
    """Renders questions in the paper's raw format or as chat messages.

    Raw: ``Human: <question>`` then ``Assistant: The answer is:``, scored on `` (A)``/`` (B)``.
    Chat: the question as the user's turn; the two choices are the whole assistant replies
    ``The answer is: (A)``/``(B)``: their shared prefix cancels when the two are normalised.
    Few-shot examples each get an independently sampled principle and a random option order.
    """

    def __init__(self, style: str, principles: Sequence[ComparisonPrinciple],
                 examples: Sequence[FeedbackExample] = (), special_tokens: Sequence[str] = ()):
        self.style = style
        self.principles = list(principles)
        self.examples = list(examples)
        self.special_tokens = [t for t in special_tokens if t]

    def choices(self) -> tuple[str, str]:
        if self.style == "raw":
            return (" (A)", " (B)")
        return (f"{ANSWER} (A)", f"{ANSWER} (B)")

    def _shots(self, rng: random.Random) -> list[tuple[str, str]]:
        shots = []
        for example in self.examples:
            principle = example.principle or rng.choice(self.principles).text
            chosen_first = rng.random() < 0.5
            a, b = (example.chosen, example.rejected) if chosen_first else (example.rejected, example.chosen)
            shots.append((question(as_messages(example.messages), principle, a, b, self.special_tokens),
                          "A" if chosen_first else "B"))
        return shots

    def build(self, conversation: Conversation, principle: str, option_a: str, option_b: str,
              rng: random.Random, prefix: str = "") -> FeedbackQuestion:
        """The question for one comparison; ``prefix`` is text the assistant has already said
        (a chain-of-thought rationale) before the answer."""
        q = question(conversation, principle, option_a, option_b, self.special_tokens)
        shots = self._shots(rng)
        if self.style == "raw":
            text = "".join(render_raw([{"role": "user", "content": sq}], False) + f"\n\nAssistant: {ANSWER} ({letter})"
                           for sq, letter in shots)
            text += render_raw([{"role": "user", "content": q}], True)
            # a rationale is scored after the same cue it was generated from
            text += f" {THINK} {prefix.strip()}\n{ANSWER}" if prefix else f" {ANSWER}"
            return FeedbackQuestion(text, self.choices())
        messages: Conversation = []
        for sq, letter in shots:
            messages += [{"role": "user", "content": sq}, {"role": "assistant", "content": f"{ANSWER} ({letter})"}]
        if prefix:
            messages.append({"role": "user", "content": q + CHAT_THINK})
            return FeedbackQuestion(messages, tuple(f"{prefix.strip()}\n{c}" for c in self.choices()))  # type: ignore[arg-type]
        messages.append({"role": "user", "content": q})
        return FeedbackQuestion(messages, self.choices())

    def rationale_prompt(self, conversation: Conversation, principle: str, option_a: str, option_b: str,
                         rng: random.Random) -> Prompt:
        """The prompt a chain-of-thought rationale is generated from (the paper's
        ``Let's think step by step:``)."""
        q = question(conversation, principle, option_a, option_b, self.special_tokens)
        if self.style == "raw":
            return render_raw([{"role": "user", "content": q}], True) + f" {THINK}"
        return [{"role": "user", "content": q + CHAT_THINK}]

    def rating_choices(self) -> tuple[str, ...]:
        """Raw: `` 1/10`` .. `` 10/10`` after the cue; chat: the whole assistant reply
        ``Rating: 1/10`` .., like ``The answer is: (A)`` (the shared ``Rating:`` cancels in the softmax)."""
        lead = " " if self.style == "raw" else f"{RATING_CUE} "
        return tuple(f"{lead}{k}{RATING_SUFFIX}" for k in RATINGS)

    def build_rating(self, conversation: Conversation, principle: str, response: str) -> RatingQuestion:
        """The rating question for one response. Few-shot examples are comparisons, not ratings, so
        none are shown: a rating question is always zero-shot."""
        q = rating_question(conversation, principle, response, self.special_tokens)
        if self.style == "raw":
            return RatingQuestion(render_raw([{"role": "user", "content": q}], True) + f" {RATING_CUE}",
                                  self.rating_choices())
        return RatingQuestion([{"role": "user", "content": q}], self.rating_choices())
