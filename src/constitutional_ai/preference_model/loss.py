"""The Bradley-Terry preference loss in its soft-label form.

A preference model gives each (conversation, response) a scalar reward ``r``; the probability that
``y_w`` is preferred to ``y_l`` is ``sigma(r_w - r_l)``. With a label ``p = P(y_w is better)``:

    L = -[p log sigma(r_w - r_l) + (1 - p) log sigma(r_l - r_w)]

the cross-entropy between the label and the model's preference probability. At ``p = 1`` (a human
label) it is the usual ``-log sigma(r_w - r_l)``; with AI soft labels it stops pushing once the
model's probability equals the label (its gradient is zero at ``sigma(r_w - r_l) = p``), so a
labeler's 0.6 is learnt as 0.6, not as certainty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_bradley_terry_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor,
                            p_chosen: torch.Tensor | None = None,
                            center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Mean soft-label Bradley-Terry loss over a batch; ``p_chosen`` None means hard labels.

    ``center_rewards_coefficient`` adds ``c * mean((r_w + r_l)^2)`` (Eisenstein et al. 2023, as in
    TRL), which keeps rewards centred on zero without changing their differences.
    """
    margin = rewards_chosen - rewards_rejected
    if p_chosen is None:
        loss = -F.logsigmoid(margin).mean()
    else:
        p = p_chosen.to(margin.dtype)
        # = -[p log sigma(m) + (1-p) log sigma(-m)], computed stably
        loss = F.binary_cross_entropy_with_logits(margin, p)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    return loss
