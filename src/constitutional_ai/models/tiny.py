"""Build tiny causal language models locally, with a tokenizer trained on the fly.

Nothing here downloads: tests, benchmarks and the offline demo (`cai run` with no model given)
need a real `from_pretrained` directory (config.json, safetensors, tokenizer) without a network.
The weights are random, so the text is gibberish; the pipeline around it is the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEMO_MODEL_VERSION = "v1"


def bundled_corpus() -> list[str]:
    """Text shipped with the package (constitution and prompts), used to train demo tokenizers."""
    root = resources.files("constitutional_ai") / "resources"
    texts = [(root / "constitution.yaml").read_text(encoding="utf-8")]
    prompts = root / "prompts"
    for name in ("red_team.jsonl", "helpful.jsonl"):
        ref = prompts / name
        if ref.is_file():
            texts.extend(ref.read_text(encoding="utf-8").splitlines())
    return texts


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024, chat: bool = False):
    """A byte-level BPE tokenizer (any text encodes) as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    bos_id = tok.token_to_id("<s>")
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>" if chat else "</s>", pad_token="<pad>",
        model_max_length=2048,
    )
    if chat:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_causal_lm(path: str | Path, *, corpus: Iterable[str] | None = None, vocab_size: int = 1024,
                         hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                         intermediate_size: int | None = None, max_positions: int = 2048, chat: bool = False,
                         seed: int = 0, initializer_range: float = 0.02) -> Path:
    """Save a randomly initialised Llama-architecture model and its tokenizer to ``path``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(corpus if corpus is not None else bundled_corpus(), vocab_size, chat)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    path.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(path)
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("CAI_CACHE_DIR", Path.home() / ".cache" / "constitutional_ai"))


def ensure_demo_model() -> Path:
    """Build the offline demo model once (a few seconds) and reuse it; atomic against concurrent runs."""
    target = cache_dir() / f"tiny-demo-{DEMO_MODEL_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-demo-", dir=target.parent))
    build_tiny_causal_lm(tmp, hidden_size=128, num_layers=4, num_heads=4, initializer_range=0.1)
    (tmp / "DEMO_MODEL.json").write_text(json.dumps({"note": "random weights, offline demo only"}))
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target
