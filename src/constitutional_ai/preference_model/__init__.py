"""RL-CAI step 3: the preference model (Bradley-Terry on soft AI labels mixed with human labels)."""

from constitutional_ai.preference_model.loss import soft_bradley_terry_loss
from constitutional_ai.preference_model.reward_model import RewardModel

__all__ = ["RewardModel", "soft_bradley_terry_loss"]
