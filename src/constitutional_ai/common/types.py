"""The words every layer speaks: a conversation, a prompt, a prompt style and a reward function.

They live on the ground floor so that a backend, a preference model and an evaluation can name
them without importing each other (or torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

#: ``[{"role": "user", "content": ...}, ...]``, as chat templates and TRL take them.
Conversation = list[dict[str, str]]
#: What a backend is asked to continue: raw text, or a conversation its chat template renders.
Prompt = str | Conversation
#: How a backend shows a conversation to its model: the paper's raw ``Human:/Assistant:`` text or a chat template.
Style = Literal["raw", "chat"]
#: ``reward_fn(prompts, responses) -> rewards``: a preference model (``RewardModel.score_responses``), the
#: feedback model (``feedback.direct_reward.FeedbackReward``) or any rule. One that sets ``last`` (a dict
#: per response of its latest call: the principle it judged under...) has it recorded with each RL step.
RewardFn = Callable[[list[Conversation], list[str]], list[float]]
