"""RL-CAI feedback: response pairs, AI preference labels from a constitution, labeler evaluation,
and direct RLAIF rewards (:class:`FeedbackReward`)."""

from constitutional_ai.feedback.direct_reward import FeedbackReward

__all__ = ["FeedbackReward"]
