"""RL-CAI step 3: the preference model (Bradley-Terry on soft AI labels mixed with human labels).

``RewardModel`` and ``soft_bradley_terry_loss`` are imported on first use, so that reading
preference data or building the CLI does not pull in torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RewardModel", "soft_bradley_terry_loss"]


def __getattr__(name: str) -> Any:
    if name == "RewardModel":
        from constitutional_ai.preference_model.reward_model import RewardModel

        return RewardModel
    if name == "soft_bradley_terry_loss":
        from constitutional_ai.preference_model.loss import soft_bradley_terry_loss

        return soft_bradley_terry_loss
    raise AttributeError(name)
