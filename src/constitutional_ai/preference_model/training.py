"""The PM as TRL training data and arguments: tokenized pairs with soft labels, and the RewardConfig."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from constitutional_ai.config import PreferenceModelConfig
from constitutional_ai.preference_model.data import PreferencePair
from constitutional_ai.preference_model.encoding import PairEncoder
from constitutional_ai.training.common import (
    training_arguments,
)


def encode_pairs(pairs: list[PreferencePair], encoder: PairEncoder) -> tuple[Any, int]:
    """A ``datasets.Dataset`` in TRL's tokenized preference format (``chosen_ids``/``rejected_ids``)
    plus ``p_chosen`` and ``length`` (for length-grouped batches); and how many sides were cut."""
    from datasets import Dataset

    rows: dict[str, list[Any]] = {"chosen_ids": [], "rejected_ids": [], "p_chosen": [], "length": []}
    truncated = 0
    for pair in pairs:
        chosen, cut_c = encoder.encode(pair.prompt, pair.chosen)
        rejected, cut_r = encoder.encode(pair.prompt, pair.rejected)
        truncated += int(cut_c or cut_r)
        rows["chosen_ids"].append(chosen)
        rows["rejected_ids"].append(rejected)
        rows["p_chosen"].append(pair.p)
        rows["length"].append(max(len(chosen), len(rejected)))
    return Dataset.from_dict(rows), truncated


def pm_training_arguments(cfg: PreferenceModelConfig, output: Path, seed: int, progress: bool) -> Any:
    from trl import RewardConfig

    return training_arguments(cfg, RewardConfig, output, seed, progress, remove_unused_columns=False,
                              center_rewards_coefficient=cfg.center_rewards_coefficient,
                              train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
                              length_column_name="length", disable_dropout=cfg.disable_dropout)
