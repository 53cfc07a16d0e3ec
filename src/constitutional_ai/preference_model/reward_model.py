"""The scoring API the RL and evaluation stages use: a trained PM, batched, on any device."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from constitutional_ai.common.errors import ModelLoadError
from constitutional_ai.common.types import Conversation
from constitutional_ai.layout import PM_INFO
from constitutional_ai.models.loading import load_tokenizer, loading, locate_model, resolve_device, resolve_dtype
from constitutional_ai.preference_model.encoding import PairEncoder


def load_sequence_classifier(name: str, revision: str | None = None, trust_remote_code: bool = False,
                             dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: any Hugging Face model as a one-output sequence classifier (a fresh
    score head on a base model, or a trained PM), safetensors only, with a padding token set."""
    from transformers import AutoModelForSequenceClassification

    path = locate_model(name, revision)
    with loading(name):  # quiet: "some weights were newly initialized" is the point here
        tokenizer = load_tokenizer(path, revision, trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True,
            **({"dtype": dtype} if dtype is not None else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ModelLoadError(f"model {name!r}: its tokenizer has no pad, eos or unk token to pad batches with")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class RewardModel:
    """Scores ``(conversation, final response)``: higher is preferred.

    ``RewardModel.from_pretrained(dir)`` loads a PM written by ``cai train-pm`` (or any one-output
    sequence classifier); :meth:`score` takes conversations that end with the assistant's turn.
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 512, batch_size: int = 32,
                 name: str = "reward-model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = PairEncoder(tokenizer, max_length)
        self.batch_size = batch_size
        self.name = name
        self.truncated = 0

    @classmethod
    def from_pretrained(cls, path: str, device: str = "auto", batch_size: int = 32,
                        max_length: int | None = None) -> RewardModel:
        info_file = Path(path) / PM_INFO
        info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
        target = resolve_device(device)
        model, tokenizer = load_sequence_classifier(path, dtype=resolve_dtype("auto", target))
        model.to(target)
        length = max_length or info.get("max_length") or min(getattr(tokenizer, "model_max_length", 512), 4096)
        return cls(model, tokenizer, max_length=int(length), batch_size=batch_size, name=str(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, conversation: Conversation, response: str) -> list[int]:
        ids, cut = self.encoder.encode(conversation, response)
        self.truncated += int(cut)
        return ids

    @torch.inference_mode()
    def score_ids(self, sequences: Sequence[list[int]]) -> list[float]:
        """Rewards of already-encoded sequences, batched longest first (little padding)."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out = [0.0] * len(sequences)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(sequences[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(sequences[i])] = torch.tensor(sequences[i])
                mask[r, :len(sequences[i])] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for r, value in zip(rows, logits[:, 0].float().tolist(), strict=True):
                out[r] = value
        return out

    def score_responses(self, prompts: Sequence[Conversation], responses: Sequence[str]) -> list[float]:
        """One reward per ``(prompt conversation, response)``."""
        return self.score_ids([self.encode(list(p), r) for p, r in zip(prompts, responses, strict=True)])

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        """One reward per conversation; each must end with the assistant turn being judged."""
        for n, conversation in enumerate(conversations):
            if not conversation or conversation[-1].get("role") != "assistant":
                raise ValueError(f"conversation {n} does not end with an assistant turn to score")
        return self.score_responses([c[:-1] for c in conversations], [c[-1]["content"] for c in conversations])
