"""Loading Hugging Face models and tokenizers the same way in every loader.

The transformers and vLLM backends and the preference model all read checkpoints from a local
directory or the Hub cache; here they share where a model comes from, how a failure becomes one
line a user can act on, and what a tokenizer says about the prompts it reads (chat or raw, which
tokens end a reply, which strings are control tokens), so that switching loaders never changes data.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from constitutional_ai.common.errors import ModelLoadError, first_line
from constitutional_ai.common.hub import hub_offline_reason, looks_like_path, quiet_model_loading
from constitutional_ai.models import model_path

#: End-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma, Phi-3).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
#: Turn markers of common chat templates, ends and starts.
CHAT_MARKERS = (*END_OF_TURN_TOKENS, "<|im_start|>", "<|start_header_id|>", "<|end_header_id|>",
                "<start_of_turn>", "<|user|>", "<|assistant|>", "<|system|>")
#: What ``from_pretrained`` raises for a model it cannot read: reported by :func:`load_error`.
LOAD_ERRORS = (OSError, ValueError, ImportError, KeyError)
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


def _no_such_directory(name: str) -> ModelLoadError:
    return ModelLoadError(f"model {name!r}: no such directory; pass a local model directory "
                          "(config.json + *.safetensors) or a Hugging Face model id")


def load_error(name: str, exc: Exception) -> ModelLoadError:
    """One actionable line for a model that failed to load, instead of transformers' traceback."""
    text = first_line(exc)
    if looks_like_path(name) and not Path(name).expanduser().exists():
        return _no_such_directory(name)
    local = Path(name).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():  # transformers' own message trails off here
        found = ", ".join(sorted(p.name for p in local.iterdir())[:8]) or "nothing"
        return ModelLoadError(f"model {name!r}: not a model directory (no config.json; it holds {found}); pass a "
                              "folder saved with save_pretrained (config.json, tokenizer files, *.safetensors)")
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


def check_hub_model(name: str, revision: str | None) -> None:
    """Fail at once, in one line, when a hub id is neither cached nor downloadable."""
    if looks_like_path(name):
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


def locate_model(name: str, revision: str | None) -> str:
    """The path to hand ``from_pretrained``, after failing fast on a hub id that cannot be fetched
    (a local directory that exists is taken as it is)."""
    path = model_path(name)
    if not Path(path).expanduser().exists():
        check_hub_model(name, revision)
    return path


@contextmanager
def loading(name: str) -> Iterator[None]:
    """Around ``from_pretrained`` calls: transformers' and the hub's chatter off, and a failure to
    read the model reported as one :func:`load_error` line."""
    try:
        with quiet_model_loading():
            yield
    except LOAD_ERRORS as exc:
        raise load_error(name, exc) from None


def load_tokenizer(path: str, revision: str | None, trust_remote_code: bool) -> Any:
    """The model's own tokenizer; call it inside :func:`loading`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


def prompt_style(tokenizer: Any, chat_format: str, name: str) -> Literal["raw", "chat"]:
    """Whether prompts go through the tokenizer's chat template or the paper's raw format."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_format == "chat_template" and not has_template:
        raise ModelLoadError(f"model {name!r} has no chat template; set policy.chat_format: raw or auto")
    return "chat" if chat_format == "chat_template" or (chat_format == "auto" and has_template) else "raw"


def end_token_ids(model_eos: int | list[int] | None, tokenizer_eos: int | None, vocab: Mapping[str, int],
                  chat: bool) -> list[int]:
    """Every token that ends a reply: the model's and the tokenizer's end-of-sequence tokens and,
    for chat models, the usual end-of-turn tokens the template writes."""
    ids: list[int | None] = []
    for value in (model_eos, tokenizer_eos):
        ids += value if isinstance(value, list) else [value]
    if chat:
        ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return sorted({i for i in ids if i is not None})


def control_strings(tokenizer: Any) -> list[str]:
    """Strings that tokenize to control tokens, longest first: text from users or models must not
    smuggle them into a prompt."""
    vocab = tokenizer.get_vocab()
    return sorted({*tokenizer.all_special_tokens, *(t for t in CHAT_MARKERS if t in vocab)}, key=len, reverse=True)


def config_context_length(hf_config: Any) -> int | None:
    """The context length a model config declares, under whichever name its architecture uses."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(hf_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
