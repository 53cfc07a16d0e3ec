"""RL-CAI feedback: response pairs, AI preference labels from a constitution, labeler evaluation."""
