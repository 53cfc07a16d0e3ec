"""OpenRLHF: our prompts as the JSONL its ``--prompt_data`` reads; the reward comes from
``cai serve-pm`` on its ``--remote_rm_url``.

What OpenRLHF does with them, as read in its source (``docs/cluster-rl.md`` names the commits):

* ``openrlhf/datasets/prompts_dataset.py`` (``preprocess_data``): with ``--apply_chat_template``
  the prompt is ``tokenizer.apply_chat_template(row[input_key], tokenize=False,
  add_generation_prompt=True)`` (a string is wrapped as one user turn); without it the row's
  ``input_key`` text is the prompt as is. So each row carries both: ``messages`` for chat policies
  (``--input_key messages --apply_chat_template``) and ``prompt``, the paper's ``Human:/Assistant:``
  transcript, for policies without a chat template (``--input_key prompt``). ``key`` (our prompt
  key) can travel as the label (``--label_key key``).
* The remote reward client (``openrlhf/utils/rollout.py``, ``RolloutAndRewardWorker``, on current
  main; ``openrlhf/utils/remote_rm_utils.py`` before) posts ``{"query": [prompt + response],
  "prompts": [prompt], "labels": [label]}`` and reads ``"rewards"`` (older clients assert it is
  there), ``"scores"`` (falling back to the rewards) and ``"extra_logs"``: exactly what
  :mod:`constitutional_ai.preference_model.server` answers, which splits each query back into the
  conversation (parsed from the prompt) and the response. The client sends no ``Authorization``
  header, so ``cai serve-pm`` behind it runs on a private network with ``--serve_pm.insecure``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from constitutional_ai.common.chat_format import render_raw
from constitutional_ai.data.prompts import PromptItem
from constitutional_ai.data.store import write_atomic

#: ``--input_key`` for chat policies (with ``--apply_chat_template``).
INPUT_KEY = "messages"
#: ``--input_key`` for policies without a chat template: the ``Human:/Assistant:`` transcript.
RAW_INPUT_KEY = "prompt"
#: ``--label_key``: our prompt key, sent back to the reward server as the label (ignored there).
LABEL_KEY = "key"


def openrlhf_row(item: PromptItem) -> dict[str, Any]:
    """One ``--prompt_data`` row: the conversation both as messages and as a raw transcript."""
    messages = [{"role": m["role"], "content": m["content"]} for m in item.messages]
    return {INPUT_KEY: messages, RAW_INPUT_KEY: render_raw(messages, add_generation_prompt=True),
            LABEL_KEY: item.key}


def write_openrlhf_jsonl(items: Sequence[PromptItem], path: str | os.PathLike[str]) -> int:
    """Write ``items`` as OpenRLHF prompt JSONL at ``path`` (whole, then renamed into place);
    returns the number of rows."""
    if not items:
        raise ValueError(f"{path}: no prompts to write")
    write_atomic(Path(path), "".join(json.dumps(openrlhf_row(item), ensure_ascii=False) + "\n" for item in items))
    return len(items)
