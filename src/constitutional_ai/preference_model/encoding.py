"""A conversation and its final response as the preference model reads them, cut to fit.

Training, evaluation, the scoring API and the HTTP endpoint all go through :class:`PairEncoder`,
so a PM scores exactly the text layout it was trained on. The final assistant turn always
survives: what does not fit is cut from the left of the conversation (its oldest turns), and only
a response longer than the whole budget is itself shortened (from its end).
"""

from __future__ import annotations

from typing import Any

from constitutional_ai.common.chat_format import render_raw
from constitutional_ai.common.types import Conversation


def transcript(conversation: Conversation) -> str:
    """The conversation in the paper's ``Human:``/``Assistant:`` layout, without the trailing cue."""
    return render_raw(conversation, add_generation_prompt=False).strip()


def _fit(context: list[int], reply: list[int], room: int) -> tuple[list[int], list[int], bool]:
    """Cut ``context`` from the left so that ``context + reply`` fits ``room``; the reply keeps at
    least three quarters of the room when it is that long (then it is cut from its end)."""
    cut = len(context) + len(reply) > room
    reply = reply[:max(1, room - min(len(context), room // 4))]
    return context[max(0, len(context) - (room - len(reply))):], reply, cut


class PairEncoder:
    """Token ids of ``(conversation, response)`` for one tokenizer, in one of three layouts.

    * encoders with ``[CLS]``/``[SEP]`` (BERT, MiniLM, RoBERTa, DeBERTa): a text pair, the
      transcript then the response, read at ``[CLS]``;
    * decoders with a chat template: the template's rendering of the conversation plus the
      response as the assistant's turn, read at its last token;
    * other decoders: the paper's raw format, ``...\\n\\nAssistant: <response>``.
    """

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        # whole transcripts are tokenized before they are cut to max_length: transformers' warning
        # about sequences longer than the model's maximum does not apply (marked as already given)
        getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
        self.layout = ("pair" if tokenizer.cls_token is not None and tokenizer.sep_token is not None
                       else "chat" if getattr(tokenizer, "chat_template", None) else "raw")
        if self.layout == "pair":
            a = len(tokenizer("a", add_special_tokens=False)["input_ids"])
            b = len(tokenizer("b", add_special_tokens=False)["input_ids"])
            self.specials = len(tokenizer("a", "b")["input_ids"]) - a - b
        else:
            self.specials = 0

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, conversation: Conversation, response: str) -> tuple[list[int], bool]:
        """``(input ids, whether anything was cut)``."""
        if self.layout == "pair":
            return self._encode_pair(conversation, response)
        if self.layout == "chat":
            messages = [*conversation, {"role": "assistant", "content": response}]
            context = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            full = self.tokenizer.apply_chat_template(messages, tokenize=False)
            reply = full[len(context):] if full.startswith(context) else response
            head, body = [], self._ids(context)
        else:
            body = self._ids(render_raw(conversation, add_generation_prompt=True))
            reply = " " + response.strip()
            bos = self.tokenizer.bos_token_id
            head = [bos] if bos is not None and getattr(self.tokenizer, "add_bos_token", True) else []
        tail = self._ids(reply)
        body, tail, cut = _fit(body, tail, self.max_length - len(head))
        return head + body + tail, cut

    def _encode_pair(self, conversation: Conversation, response: str) -> tuple[list[int], bool]:
        context, reply, cut = _fit(self._ids(transcript(conversation)), self._ids(response.strip()),
                                   self.max_length - self.specials)
        if not context:
            return self.tokenizer(self.tokenizer.decode(reply))["input_ids"][:self.max_length], cut
        # the tokenizer's own pair template adds the special tokens; the ids round-trip through text
        ids = self.tokenizer(self.tokenizer.decode(context), self.tokenizer.decode(reply),
                             truncation="only_first", max_length=self.max_length)["input_ids"]
        return ids, cut
