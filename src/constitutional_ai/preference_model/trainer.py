"""TRL's ``RewardTrainer`` with soft labels.

TRL's reward trainer takes hard labels (with an optional margin). Everything else it does (data
collation, accelerate/DeepSpeed, gradient accumulation, bf16, PEFT, checkpoints, resume, ``report_to``
logging, its reward/accuracy/margin metrics) we keep; this subclass carries each pair's
``p_chosen`` through the collator, replaces the loss with
:func:`~constitutional_ai.preference_model.loss.soft_bradley_terry_loss`, and can run each forward
over the batch's real tokens only (:mod:`~constitutional_ai.preference_model.packing`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from constitutional_ai.preference_model.loss import soft_bradley_terry_loss
from constitutional_ai.preference_model.packing import packed_attention_installed, packing_matches, padding_free

log = logging.getLogger(__name__)


@dataclass
class SoftLabelCollator(DataCollatorForPreference):
    """TRL's preference collator (chosen rows, then rejected rows, right-padded) plus ``p_chosen``."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        out["p_chosen"] = torch.tensor([float(e.get("p_chosen", 1.0)) for e in examples], dtype=torch.float)
        return out


class SoftLabelRewardTrainer(RewardTrainer):
    """``RewardTrainer`` whose loss is the soft-label Bradley-Terry loss (equal to TRL's at p = 1).

    ``padding_free``: compute every forward over the batch's real tokens only, and the last layer
    over the positions the head pools only. The first batch checks that this model's packed
    forward gives its padded rewards, with the last layer pooled-only and else without; where
    neither does (an architecture that ignores packed position ids), training goes on padded and
    says so once. ``padding_free_used`` and ``pooled_only_used`` then record what ran (None
    before the first batch). Within
    ``train()`` the packed attention stays installed from the first packed batch to the end:
    gradient checkpointing recomputes layers during the backward pass, outside the forward's
    ``padding_free`` block, and must recompute them packed.
    """

    def __init__(self, *args: Any, padding_free: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.padding_free_used: bool | None = None if padding_free else False
        self.pooled_only_used: bool | None = self.padding_free_used
        #: Open only during ``train()``: holds the packed attention from the first packed batch to its end.
        self._during_train: contextlib.ExitStack | None = None

    def train(self, *args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as self._during_train:
            if self.padding_free_used:  # a second train() (a retry, a resume) on a trainer that already packs
                self._during_train.enter_context(packed_attention_installed(self.model))
            try:
                return super().train(*args, **kwargs)
            finally:
                self._during_train = None

    def _check_padding_free(self, model: Any, inputs: dict[str, Any]) -> tuple[bool, bool]:
        """``(padding_free, pooled_only)`` for this model, the same on every process."""
        rows = inputs["input_ids"].shape[0]
        probe = sorted({0, 1, rows // 2, rows - 1})  # chosen and rejected rows
        ids, mask = inputs["input_ids"][probe], inputs["attention_mask"][probe]
        half = bool(self.args.bf16 or self.args.fp16)  # autocast inside the forward: the check cannot see it
        pooled, why = packing_matches(model, ids, mask, half=half)
        ok = pooled
        if not pooled:
            ok, why_packed = packing_matches(model, ids, mask, pooled_only=False, half=half)
            why = f"{why_packed} (the last layer computes every position: pooled-only, {why})" if ok else why
        if self.accelerator.num_processes > 1:  # every rank packs alike: their forwards must match
            agreed = self.accelerator.gather(torch.tensor([[int(ok), int(pooled)]], device=self.accelerator.device))
            everywhere, pooled_everywhere = (bool(v) for v in agreed.min(0).values)
            if ok and not everywhere:
                why = "another process's first batch failed the check"
            ok, pooled = ok and everywhere, pooled and pooled_everywhere
        if ok:
            log.info("padding-free PM training: %s", why)
        else:
            log.warning("padding-free PM training is off for %s: %s; training on padded batches",
                        type(self.accelerator.unwrap_model(model)).__name__, why)
        return ok, pooled

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        mode = "train" if self.model.training else "eval"
        p_chosen = inputs.pop("p_chosen", None)
        inputs.pop("margin", None)
        if self.padding_free_used is None:
            self.padding_free_used, self.pooled_only_used = self._check_padding_free(model, inputs)
            if self.padding_free_used and self._during_train is not None:  # kept until train() ends
                self._during_train.enter_context(packed_attention_installed(model))
        packed = padding_free(model, bool(self.pooled_only_used)) if self.padding_free_used else None
        with packed or contextlib.nullcontext():
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            use_cache=False)
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
