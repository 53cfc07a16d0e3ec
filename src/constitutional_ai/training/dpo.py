"""``cai dpo``: the route the Hugging Face CAI recipe took, TRL's ``DPOTrainer`` on the AI
preference pairs, with no reward model and no sampling during training.

DPO takes hard preferences: each pair's ``chosen`` is the labeler's winner; the soft label is not
used (pairs near 0.5 are as close to noise as DPO can see, which is why PPO on a PM trained with
the soft labels keeps that information). The trained policy is ``<output_dir>/dpo/model``.
"""

from __future__ import annotations

from typing import Any

from constitutional_ai.common.chat_format import render_raw
from constitutional_ai.preference_model.data import PreferencePair


def dpo_row(pair: PreferencePair, tokenizer: Any) -> dict[str, Any]:
    """TRL's preference format: conversational for chat models, the paper's raw text otherwise."""
    if getattr(tokenizer, "chat_template", None):
        return {"prompt": pair.prompt, "chosen": [{"role": "assistant", "content": pair.chosen}],
                "rejected": [{"role": "assistant", "content": pair.rejected}]}
    eos = tokenizer.eos_token or ""
    return {"prompt": render_raw(pair.prompt, add_generation_prompt=True), "chosen": f" {pair.chosen}{eos}",
            "rejected": f" {pair.rejected}{eos}"}
