"""``cai sft``: SL-CAI fine-tuning with TRL's ``SFTTrainer`` on the exported revisions.

Each conversation becomes a prompt-completion pair (everything before the final assistant turn,
then that turn), so the loss falls on the assistant's (revised) answer only, and the result is an
ordinary ``from_pretrained`` checkpoint in ``<output_dir>/sft/model``: the RL policy.
"""

from __future__ import annotations

from typing import Any

from constitutional_ai.common.chat_format import render_raw


def prompt_completion(messages: list[dict[str, str]], tokenizer: Any) -> dict[str, Any]:
    """TRL's prompt-completion form of one conversation: conversational for chat models, the
    paper's raw text (ending in the end-of-sequence token) for the rest."""
    if getattr(tokenizer, "chat_template", None):
        return {"prompt": messages[:-1], "completion": [messages[-1]]}
    return {"prompt": render_raw(messages[:-1], add_generation_prompt=True),
            "completion": " " + messages[-1]["content"].strip() + (tokenizer.eos_token or "")}
