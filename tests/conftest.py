"""Shared fixtures: tiny local models built once per session (no downloads), fake backends."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from constitutional_ai.backends.base import Generation
from constitutional_ai.config import GenerationParams, RunConfig

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach for the network
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does: steady on a shared CPU

import torch

# Tiny models run fastest on one thread, and a second busy process on a 2-core machine makes
# OpenMP's spinning threads 100x slower; one thread keeps the suite fast and steady.
torch.set_num_threads(1)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PAPER_DIR = SHARED_DATA / "cai-paper"
HH_DEV = SHARED_DATA / "hh-rlhf" / "harmless-dev.jsonl"

needs_paper = pytest.mark.skipif(not PAPER_DIR.is_dir(), reason="../shared/data/cai-paper is absent")
needs_hh = pytest.mark.skipif(not HH_DEV.is_file(), reason="../shared/data/hh-rlhf is absent")


def _build(root: Path, chat: bool) -> Path:
    from constitutional_ai.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(root / ("chat" if chat else "raw"), vocab_size=512, hidden_size=32, num_layers=2,
                                num_heads=2, chat=chat, seed=0, initializer_range=0.2)


def write_sft_data(path: Path, n: int) -> list[dict[str, Any]]:
    """``n`` SFT conversations (a question, then the same safe answer) as JSONL at ``path``."""
    import json

    rows = [{"messages": [{"role": "user", "content": f"How do I do thing {i}?"},
                          {"role": "assistant", "content": "I can't help with that, but here is a safe way."}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama with a BPE tokenizer and no chat template (the paper's raw format)."""
    return _build(tmp_path_factory.mktemp("models"), chat=False)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same, with a ChatML chat template."""
    return _build(tmp_path_factory.mktemp("models"), chat=True)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cai-cache"))


class ScriptedBackend:
    """A backend that answers from a function and records every call, to test stages exactly."""

    def __init__(self, style: str = "raw", answer: Any = None, context_length: int = 4096):
        self.model_id = "scripted"
        self.style = style
        self.context_length = context_length
        self.calls: list[list[Any]] = []
        self.params: list[GenerationParams] = []
        self._answer = answer or (lambda prompt, n: f" answer {n}")
        self.finish = "stop"

    def count_tokens(self, prompts: Sequence[Any]) -> list[int]:
        return [len(str(p)) // 4 for p in prompts]

    def generate(self, prompts: Sequence[Any], params: GenerationParams,
                 seeds: Sequence[int] | None = None) -> list[Generation]:
        self.calls.append(list(prompts))
        self.params.append(params)
        n = len(self.calls)
        return [Generation(self._answer(p, n), self.finish, 1, 3) for p in prompts]

    def score_choices(self, prompts: Sequence[Any], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        return [[0.0] * len(c) for c in choices]

    def close(self) -> None:
        pass


# -- RL on a tiny policy with a planted reward (tests/test_rl.py, tests/test_direct_reward.py) ------------
def planted_word(model_dir: Path) -> str:
    """A token the tiny random policy samples often enough to learn from (never end-of-sequence)."""
    import collections

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from constitutional_ai.common.chat_format import render_raw
    from constitutional_ai.stages.rl import rl_prompts

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    prompts = [render_raw(p) for p in rl_prompts(RunConfig())[:32]]  # what the policy will be asked
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=True, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)
    counts = collections.Counter(out[:, enc["input_ids"].shape[1]:].flatten().tolist())
    special = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
    return next(tokenizer.decode([t]) for t, _ in counts.most_common()
                if t not in special and tokenizer.decode([t]).strip())


def rl_config(tmp_path: Path, model_dir: Path, **rl) -> RunConfig:
    return RunConfig().with_overrides({
        "output_dir": str(tmp_path / "run"), "progress": False, "rl.policy": str(model_dir), "rl.device": "cpu",
        "rl.value_model": "head", "rl.batch_size": 16, "rl.num_mini_batches": 2, "rl.ppo_epochs": 4,
        "rl.max_new_tokens": 16, "rl.learning_rate": 1e-3, "rl.total_steps": 24, "rl.save_steps": 100,
        **{f"rl.{k}": v for k, v in rl.items()}})
