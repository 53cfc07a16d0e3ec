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
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEMO_MODEL_VERSION = "v3"


def bundled_corpus() -> list[str]:
    """The package's own text (constitution, worked examples, embedded prompts and helpful answers)
    rendered in the paper's dialogue format: what the demo tokenizer and model are trained on."""
    from constitutional_ai.common.chat_format import render_raw
    from constitutional_ai.constitution.model import Constitution
    from constitutional_ai.constitution.prompts import CritiquePromptBuilder

    constitution = Constitution.default()
    texts = [CritiquePromptBuilder.raw_example(e) for e in constitution.critique_examples]
    texts += [render_raw([*e.messages, {"role": "assistant", "content": e.chosen}], False)
              for e in constitution.feedback_examples]
    texts += [f"\n\nCritiqueRequest: {p.critique_request}\n\nRevisionRequest: {p.revision_request}"
              for p in constitution.critique_revision]
    prompts = resources.files("constitutional_ai") / "resources" / "prompts"
    for name in ("red_team.jsonl", "helpful.jsonl"):
        for line in (prompts / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            texts.append(render_raw(messages, add_generation_prompt=False))
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
                         seed: int = 0, initializer_range: float = 0.02, num_kv_heads: int | None = None,
                         model_vocab_size: int | None = None) -> Path:
    """Save a randomly initialised Llama-architecture model and its tokenizer to ``path``.

    ``num_kv_heads`` below ``num_heads`` gives grouped-query attention (Qwen2.5, Llama 3);
    ``model_vocab_size`` pads the tokenizer with inert added tokens up to that many, so the
    embedding and LM head have a real model's width even though a small corpus trains fewer merges."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(corpus if corpus is not None else bundled_corpus(), vocab_size, chat)
    if model_vocab_size and len(tokenizer) < model_vocab_size:
        tokenizer.add_tokens([f"<unused_{i}>" for i in range(model_vocab_size - len(tokenizer))])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
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
    _save_quietly(model, path)
    tokenizer.save_pretrained(path)
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("CAI_CACHE_DIR", Path.home() / ".cache" / "constitutional_ai"))


def pretrain_on_corpus(path: str | Path, corpus: list[str], steps: int = 300, seq_len: int = 96,
                       batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
                       on_step: Callable[[int, float], None] | None = None) -> float:
    """A few hundred next-token steps on ``corpus`` so the demo model writes words, not bytes.

    It learns the bundled text's vocabulary and phrasing in seconds; it is not aligned and not a
    language model anyone should use, only enough for the offline demo to read like the real thing.
    ``on_step(step, loss)`` follows progress. Returns the final training loss.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    # one long stream, cut into windows below: longer than the model's context on purpose
    ids = tokenizer("\n\n".join(corpus), add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, float(loss.detach()))
    model.eval()
    _save_quietly(model, path)
    return float(loss.detach())


def _save_quietly(model: Any, path: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        hf_logging.enable_progress_bar()


#: The demo model's training: enough steps to write the bundled text's words (loss about 2),
#: few enough to build in well under half a minute on two cores.
DEMO_STEPS = 120
DEMO_LR = 4e-3


def ensure_demo_model() -> Path:
    """Build the offline demo model once (under half a minute on two CPU cores, with its own
    progress bar) and reuse it from the cache.

    Built in a temporary directory and renamed into place, so concurrent runs and a kill halfway
    never leave a broken model in the cache.
    """
    from constitutional_ai.common.progress import StageProgress, console

    target = cache_dir() / f"tiny-demo-{DEMO_MODEL_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"building the offline demo model once (cached in {target})", highlight=False)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-demo-", dir=target.parent))
    corpus = bundled_corpus()
    with StageProgress("demo model", total=DEMO_STEPS, unit="steps") as bar:
        bar.update(0, status="training a tokenizer")
        build_tiny_causal_lm(tmp, corpus=corpus, hidden_size=128, num_layers=4, num_heads=4)
        loss = pretrain_on_corpus(tmp, corpus, steps=DEMO_STEPS, lr=DEMO_LR,
                                  on_step=lambda step, loss: bar.update(step, status=f"loss {loss:.2f}"))
    (tmp / "DEMO_MODEL.json").write_text(json.dumps({
        "note": f"offline demo model: random init, {DEMO_STEPS} steps on the package's own text; not aligned",
        "final_loss": round(loss, 3)}))
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target
