"""Training that is not RL: SFT and DPO through TRL, and what every training stage shares."""
