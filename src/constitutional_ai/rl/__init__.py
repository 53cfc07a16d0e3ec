"""RL-CAI: supervised fine-tuning on revisions, then RL against the preference model (PPO, RLOO, GRPO, DPO)."""
