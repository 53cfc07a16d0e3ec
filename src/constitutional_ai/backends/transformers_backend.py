"""In-process Hugging Face transformers backend, the default.

Throughput on small hardware comes from batching: prompts are tokenized once, sorted by length
so each micro-batch carries little padding, left-padded, and generated together; each sequence
stops on its own at end-of-sequence or a stop string.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from constitutional_ai.backends.base import Generation
from constitutional_ai.chat_format import render_raw
from constitutional_ai.config import EMBEDDED_MODEL, GenerationParams, ModelConfig
from constitutional_ai.constitution.prompts import Prompt
from constitutional_ai.errors import ModelLoadError
from constitutional_ai.hub import hub_offline_reason, quiet_hub_logs

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it, fp16 on other accelerators, fp32 on CPU."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def _looks_local(name: str) -> bool:
    """A filesystem path rather than a hub id (``org/name`` or ``name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _no_such_directory(name: str) -> ModelLoadError:
    return ModelLoadError(f"model {name!r}: no such directory; pass a local model directory "
                          "(config.json + *.safetensors) or a Hugging Face model id")


def _load_error(name: str, exc: Exception) -> ModelLoadError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _looks_local(name) and not Path(name).expanduser().exists():
        return _no_such_directory(name)
    lowered = text.lower()
    if any(k in lowered for k in ("connect", "offline", "resolve", "couldn't find", "not a local folder",
                                  "does not appear to have", "repository not found", "hub")):
        return ModelLoadError(
            f"model {name!r}: cannot be loaded from a local directory or the Hugging Face cache and "
            "cannot be downloaded here; run `hf download {name}` on a machine with network access "
            "and pass the local directory (or point HF_HOME at a cache that holds it)".replace("{name}", name))
    if "safetensors" in lowered:
        return ModelLoadError(f"model {name!r}: no safetensors weights; convert the checkpoint to "
                              "safetensors (we never load pickled .bin weights)")
    if "trust_remote_code" in lowered or "custom code" in lowered:
        return ModelLoadError(f"model {name!r} needs code shipped with the model; read it, then set "
                              "policy.trust_remote_code: true (--trust-remote-code) to allow it")
    return ModelLoadError(f"model {name!r}: cannot be loaded: {text}")


def _check_hub_model(name: str, revision: str | None) -> None:
    """Fail at once, in one line, when a hub id is neither cached nor downloadable."""
    if _looks_local(name):
        raise _no_such_directory(name)
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            return
    except Exception:  # a malformed id is reported by from_pretrained below
        return
    reason = hub_offline_reason()
    if reason:
        raise ModelLoadError(
            f"model {name!r}: not in the local Hugging Face cache and cannot be downloaded ({reason}); run "
            f"`hf download {name}` where there is network access and pass the local directory, or point "
            "HF_HOME at a cache that holds it")


class TransformersBackend:
    """:class:`~constitutional_ai.backends.base.LanguageModel` over ``AutoModelForCausalLM``."""

    def __init__(self, config: ModelConfig, model: Any = None, tokenizer: Any = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.config = config
        name = config.model_name_or_path
        path = name
        if name == EMBEDDED_MODEL:
            from constitutional_ai.models.tiny import ensure_demo_model

            path = str(ensure_demo_model())
        self.model_id = name
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if not Path(path).expanduser().exists():
            _check_hub_model(name, config.revision)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            with quiet_hub_logs():
                self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(
                    path, revision=config.revision, trust_remote_code=config.trust_remote_code)
                self.model = model or AutoModelForCausalLM.from_pretrained(
                    path, revision=config.revision, trust_remote_code=config.trust_remote_code,
                    dtype=self.dtype, use_safetensors=True)
        except (OSError, ValueError, ImportError, KeyError) as exc:
            raise _load_error(name, exc) from None
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        self.model.to(self.device)
        self.model.eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        has_template = getattr(self.tokenizer, "chat_template", None) is not None
        if config.chat_format == "chat_template" and not has_template:
            raise ModelLoadError(f"model {name!r} has no chat template; set policy.chat_format: raw or auto")
        self.style: Literal["raw", "chat"] = (
            "chat" if (config.chat_format == "chat_template"
                       or (config.chat_format == "auto" and has_template)) else "raw")
        self.context_length = config.max_context or self._read_context_length()
        gen_eos = self.model.generation_config.eos_token_id
        eos = gen_eos if gen_eos is not None else self.tokenizer.eos_token_id
        self.eos_token_ids: list[int] = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]

    def _read_context_length(self) -> int:
        cfg = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        return tok_max if isinstance(tok_max, int) and tok_max < 10**7 else 2048

    # -- formatting ------------------------------------------------------------------------------
    def format(self, prompt: Prompt) -> str:
        """The exact text the model sees for a prompt."""
        if isinstance(prompt, str):
            return prompt
        if self.style == "chat":
            return self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        return render_raw(prompt, add_generation_prompt=True)

    def _encode(self, prompt: Prompt) -> list[int]:
        # A chat template writes its own special tokens; raw text gets the tokenizer's BOS.
        add_special = isinstance(prompt, str) or self.style == "raw"
        return self.tokenizer(self.format(prompt), add_special_tokens=add_special)["input_ids"]

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        return [len(self._encode(p)) for p in prompts]

    # -- generation ------------------------------------------------------------------------------
    def _gen_config(self, params: GenerationParams) -> Any:
        from transformers import GenerationConfig

        # Every sampling knob is set explicitly: a value left unset would be filled from the model's
        # generation_config.json (a repetition penalty, a top-k), and the records would no longer
        # say how their text was sampled.
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": not params.greedy,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.eos_token_ids or None,
            "repetition_penalty": 1.0,
            "top_k": params.top_k,  # 0 disables top-k
            "top_p": params.top_p,
        }
        if not params.greedy:
            kwargs["temperature"] = params.temperature
        if self.device.type == "cpu":
            # A preallocated KV cache spares the per-token concatenation that dominates small
            # models on CPU (about 7% of a critique run); GPUs keep the default dynamic cache.
            kwargs["cache_implementation"] = "static"
        if params.stop:
            kwargs["stop_strings"] = list(params.stop)
        return GenerationConfig(**kwargs)

    @staticmethod
    def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: GenerationParams,
                 seed: int | None = None) -> list[Generation]:
        if not prompts:
            return []
        encoded = [self._encode(p) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        gen_config = self._gen_config(params)
        out: list[Generation | None] = [None] * len(prompts)
        bs = self.config.batch_size
        for chunk_index, start in enumerate(range(0, len(order), bs)):
            idx = order[start:start + bs]
            batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if seed is not None:
                torch.manual_seed(seed + chunk_index)
            sequences = self.model.generate(**batch, generation_config=gen_config,
                                            tokenizer=self.tokenizer if params.stop else None)
            new_tokens = sequences[:, batch["input_ids"].shape[1]:].tolist()
            for row, i in enumerate(idx):
                tokens = new_tokens[row]
                n, hit_eos = len(tokens), False
                for pos, tok in enumerate(tokens):
                    if tok in self.eos_token_ids:
                        n, hit_eos = pos, True
                        break
                if not hit_eos and self.tokenizer.pad_token_id not in self.eos_token_ids:
                    while n and tokens[n - 1] == self.tokenizer.pad_token_id:
                        n -= 1
                text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
                text, hit_stop = self._cut_at_stop(text, params.stop)
                finished = hit_eos or hit_stop
                out[i] = Generation(text=text, finish_reason="stop" if finished else "length",
                                    prompt_tokens=len(encoded[i]), completion_tokens=n)
        return [g for g in out if g is not None]

    # -- scoring ---------------------------------------------------------------------------------
    def _split_ids(self, prompt: Prompt, choice: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt and of the continuation, tokenized as the model would see them."""
        context = self._encode(prompt)
        add_special = isinstance(prompt, str) or self.style == "raw"
        full = self.tokenizer(self.format(prompt) + choice, add_special_tokens=add_special)["input_ids"]
        if full[:len(context)] == context and len(full) > len(context):
            return context, full[len(context):]
        return context, self.tokenizer(choice, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def score_choices(self, prompts: Sequence[Prompt], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        if len(prompts) != len(choices):
            raise ValueError("score_choices needs one list of choices per prompt")
        items = [(i, j, *self._split_ids(p, c))
                 for i, (p, cs) in enumerate(zip(prompts, choices, strict=True)) for j, c in enumerate(cs)]
        scores: list[list[float]] = [[0.0] * len(cs) for cs in choices]
        items.sort(key=lambda it: -(len(it[2]) + len(it[3])))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(items), self.config.batch_size):
            chunk = items[start:start + self.config.batch_size]
            width = max(len(c) + len(x) for _, _, c, x in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (_, _, ctx, cont) in enumerate(chunk):
                seq = ctx + cont
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, (i, j, ctx, cont) in enumerate(chunk):
                positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=logprobs.device)
                targets = torch.tensor(cont, device=logprobs.device)
                scores[i][j] = float(logprobs[row, positions, targets].sum())
        return scores

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
