"""TRL's ``RewardTrainer`` with soft labels.

TRL's reward trainer takes hard labels (with an optional margin). Everything else it does (data
collation, accelerate/DeepSpeed, gradient accumulation, bf16, PEFT, checkpoints, resume, ``report_to``
logging, its reward/accuracy/margin metrics) we keep; this subclass only carries each pair's
``p_chosen`` through the collator and replaces the loss with
:func:`~constitutional_ai.preference_model.loss.soft_bradley_terry_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from constitutional_ai.preference_model.loss import soft_bradley_terry_loss


@dataclass
class SoftLabelCollator(DataCollatorForPreference):
    """TRL's preference collator (chosen rows, then rejected rows, right-padded) plus ``p_chosen``."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        out["p_chosen"] = torch.tensor([float(e.get("p_chosen", 1.0)) for e in examples], dtype=torch.float)
        return out


class SoftLabelRewardTrainer(RewardTrainer):
    """``RewardTrainer`` whose loss is the soft-label Bradley-Terry loss (equal to TRL's at p = 1)."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        mode = "train" if self.model.training else "eval"
        p_chosen = inputs.pop("p_chosen", None)
        inputs.pop("margin", None)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        loss = soft_bradley_terry_loss(rewards_chosen, rewards_rejected, p_chosen,
                                       self.args.center_rewards_coefficient)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            rewards = self.accelerator.gather(outputs.logits)
            self._metrics[mode]["mean_reward"].append(rewards.mean().item())
            accuracy = self.accelerator.gather_for_metrics((rewards_chosen > rewards_rejected).float().mean())
            self._metrics[mode]["accuracy"].append(accuracy.mean().item())
            margin = self.accelerator.gather_for_metrics((rewards_chosen - rewards_rejected).mean())
            self._metrics[mode]["margin"].append(margin.mean().item())
        return (loss, outputs) if return_outputs else loss
