"""In-process vLLM engine behind the backend protocol, for GPU throughput.

vLLM schedules whatever it is handed (continuous batching over a paged KV cache; in generation,
shared prompt starts such as the constitution and few-shot blocks are cached once), so every call
goes to the engine whole, as one ``LLM.generate``, and this backend never batches on its own.

Switching from the transformers backend must change speed, never data: prompts are rendered and
tokenized here with the model's Hugging Face tokenizer, exactly as the transformers backend does,
and sent as token ids (vLLM's own text path would add a BOS to chat-templated text); completions
are cut at end tokens and stop strings and decoded here too. The decisions that do not touch the
engine are pure functions of this module, so they are tested on any machine.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from constitutional_ai.backends.base import FinishReason, Generation, cut_at_stop
from constitutional_ai.backends.prefix_scorer import common_length
from constitutional_ai.common.chat_format import render_raw
from constitutional_ai.common.errors import CAIError, DataError, ModelLoadError, first_line
from constitutional_ai.common.types import Prompt
from constitutional_ai.config import GenerationParams, ModelConfig
from constitutional_ai.models.loading import (
    LOAD_ERRORS,
    config_context_length,
    control_strings,
    end_token_ids,
    load_error,
    load_tokenizer,
    loading,
    locate_model,
    prompt_style,
)

#: What to tell a user whose environment cannot run the engine at all.
INSTALL_HINT = "pip install 'constitutional-ai[vllm]' on a machine with a CUDA GPU, or use backend: transformers"
#: Per-position candidates asked for with prompt log-probabilities. vLLM always adds the prompt's own
#: token; 0 would be enough, but some v1 releases returned no prompt log-probabilities at all for 0.
PROMPT_LOGPROBS = 1


# -- pure pieces (no vllm import) ------------------------------------------------------------------
def check_device(device: str) -> None:
    """vLLM places the model itself, so a device other than ``auto``/``cuda`` would be silently ignored."""
    if device in ("auto", "cuda"):
        return
    if device.startswith("cuda:"):
        raise ModelLoadError(f"backend vllm places the model itself and cannot take device {device!r}; leave "
                             f"--device auto and set CUDA_VISIBLE_DEVICES={device.split(':', 1)[1]} to pick that GPU")
    raise ModelLoadError(f"backend vllm runs on CUDA GPUs, not device {device!r}; use backend: transformers there")


def engine_kwargs(config: ModelConfig, path: str) -> dict[str, Any]:
    """``vllm.LLM`` arguments for a model config.

    ``batch_size`` is left out on purpose: vLLM sizes its batches from the free KV-cache memory, and
    our per-pass cap would only throttle it. ``dtype: auto`` is passed through (vLLM then uses the
    checkpoint's dtype, half precision for float32 checkpoints) because resolving it here would
    initialise CUDA in this process before the engine forks its workers. Only safetensors are read
    and model code runs only when the config allows it, as in the transformers backend.
    """
    return {
        "model": path,
        "tokenizer": path,
        "revision": config.revision,
        "tokenizer_revision": config.revision,
        "dtype": config.dtype,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enable_prefix_caching": config.enable_prefix_caching,
        "max_model_len": config.max_context,
        "trust_remote_code": config.trust_remote_code,
        "seed": 0,
        "load_format": "safetensors",
    }


def sampling_kwargs(params: GenerationParams, seed: int | None, stop_token_ids: Sequence[int],
                    top_k_off: int) -> dict[str, Any]:
    """``SamplingParams`` arguments for one prompt.

    Built from our params alone, never from the engine's defaults: a model's generation_config.json
    may carry sampling defaults (repetition penalty, min_p...) that would otherwise apply silently.
    ``top_k_off`` is the installed vLLM's own "disabled" value (-1 in older releases, which reject 0;
    0 in newer ones). End tokens are given explicitly so that chat models stop at end-of-turn
    markers as they do in the transformers backend. Empty stop strings are left to the caller's
    cut (vLLM rejects them).
    """
    greedy = params.greedy
    return {
        "n": 1,
        "max_tokens": params.max_new_tokens,
        "temperature": 0.0 if greedy else params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "top_k": params.top_k if params.top_k and not greedy else top_k_off,
        "seed": None if greedy or seed is None else seed % 2**63,
        "stop": [s for s in params.stop if s],
        "stop_token_ids": list(stop_token_ids),
    }


def completion_length(token_ids: Sequence[int], end_ids: Sequence[int], pad_id: int | None) -> tuple[int, bool]:
    """Tokens that belong to the reply, and whether an end token closed it.

    The end token itself is not counted. Without one, trailing pad tokens are dropped, as the
    transformers backend must for its padded batches, so both report the same ``completion_tokens``.
    """
    ends = set(end_ids)
    for pos, tok in enumerate(token_ids):
        if tok in ends:
            return pos, True
    n = len(token_ids)
    while n and pad_id is not None and token_ids[n - 1] == pad_id:
        n -= 1
    return n, False


def finish_generation(token_ids: Sequence[int], prompt_tokens: int, end_ids: Sequence[int], pad_id: int | None,
                      decode: Callable[[list[int]], str], stops: Sequence[str],
                      engine_reason: str | None = None) -> Generation:
    """One engine completion as the transformers backend reports it.

    ``engine_reason`` is vLLM's own verdict; its ``stop`` counts too, for an end token the engine knew
    and we did not.
    """
    n, hit_end = completion_length(token_ids, end_ids, pad_id)
    text, hit_stop = cut_at_stop(decode(list(token_ids[:n])), stops)
    reason: FinishReason = "stop" if hit_end or hit_stop or engine_reason == "stop" else "length"
    return Generation(text=text, finish_reason=reason, prompt_tokens=prompt_tokens, completion_tokens=n)


def split_continuation(context: Sequence[int], full: Sequence[int]) -> tuple[list[int], list[int]]:
    """Split the ids of prompt + choice into (context, continuation) at the longest common prefix
    with the prompt's own ids, so that a token merging the prompt's end with the choice's start is
    scored as part of the continuation (as in the transformers backend)."""
    common = common_length(context, full)
    if common == 0:
        raise ValueError("score_choices needs a non-empty prompt")
    return (list(full), []) if common == len(full) else (list(full[:common]), list(full[common:]))


def continuation_logprob(prompt_logprobs: Sequence[Mapping[int, Any] | None] | None, token_ids: Sequence[int],
                         start: int) -> float:
    """Sum of log p(token_ids[pos] | token_ids[:pos]) for pos from ``start`` on, read from vLLM's
    ``RequestOutput.prompt_logprobs`` (None at position 0, then per position a dict from token id to
    a ``Logprob``, or a float)."""
    if start < 1:
        raise ValueError("the first prompt token has no log-probability")
    total = 0.0
    for pos in range(start, len(token_ids)):
        entry = prompt_logprobs[pos] if prompt_logprobs is not None and pos < len(prompt_logprobs) else None
        value = entry.get(token_ids[pos]) if entry is not None else None
        if value is None:
            raise CAIError(f"vllm returned no log-probability for prompt position {pos}; this vllm version cannot "
                           "score choices (use backend: transformers or a vllm release with prompt_logprobs)")
        total += float(getattr(value, "logprob", value))
    return total


def render(tokenizer: Any, style: Literal["raw", "chat"], prompt: Prompt, model_id: str) -> str:
    """The exact text the model sees for a prompt (the transformers backend's ``format``)."""
    if isinstance(prompt, str):
        return prompt
    if style == "raw":
        return render_raw(prompt, add_generation_prompt=True)
    try:
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja's TemplateError and friends, raised by the model's own template
        raise DataError(f"model {model_id!r}: its chat template rejects this conversation "
                        f"({first_line(exc)}); fix the prompt's roles or use --chat-format raw") from None


def add_special(prompt: Prompt, style: Literal["raw", "chat"]) -> bool:
    """A chat template writes its own special tokens; raw text gets the tokenizer's BOS."""
    return isinstance(prompt, str) or style == "raw"


def _batch_ids(tokenizer: Any, strings: list[str], flags: list[bool]) -> list[list[int]]:
    if not strings:
        return []
    if len(set(flags)) > 1:
        return [tokenizer(x, add_special_tokens=f)["input_ids"] for x, f in zip(strings, flags, strict=True)]
    return tokenizer(strings, add_special_tokens=flags[0])["input_ids"]


def tokenize_choices(tokenizer: Any, texts: Sequence[str], special: Sequence[bool],
                     choices: Sequence[Sequence[str]]) -> list[list[tuple[list[int], list[int]]]]:
    """Per prompt, per choice: (context ids, continuation ids), prompt and prompt + choice tokenized
    together as the model reads them; see :func:`split_continuation`."""
    flat = [(t, c, sp) for t, cs, sp in zip(texts, choices, special, strict=True) for c in cs]
    contexts = _batch_ids(tokenizer, list(texts), list(special))
    fulls = iter(_batch_ids(tokenizer, [t + c for t, c, _ in flat], [sp for _, _, sp in flat]))
    return [[split_continuation(context, next(fulls)) for _ in cs] for context, cs in zip(contexts, choices,
                                                                                              strict=True)]


def engine_error(name: str, exc: Exception, gpu_memory_utilization: float) -> ModelLoadError:
    """One line for a failed engine start. vLLM v1 starts its engine in a child process, whose own
    error reaches us only as "Engine core initialization failed": its log above the line says why."""
    text = first_line(exc)
    lowered = text.lower()
    if "cannot find any model weights" in lowered:
        # reworded, since vLLM's message names the cache path, which may contain "hub"
        return load_error(name, OSError("no safetensors weights"))
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in lowered or "gpu_memory_utilization" in lowered:
        return ModelLoadError(f"model {name!r} does not fit the GPU memory vllm may use ({text}); raise "
                              f"gpu_memory_utilization (now {gpu_memory_utilization}), lower --max-context or "
                              "split it over more GPUs with tensor_parallel_size")
    if isinstance(exc, LOAD_ERRORS):
        return load_error(name, exc)
    return ModelLoadError(f"model {name!r}: the vllm engine failed to start ({text}); its log above says why")


def _model_eos(path: str, hf_config: Any, revision: str | None) -> int | list[int] | None:
    """The end-of-sequence id(s) transformers would put in ``model.generation_config``."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path, revision=revision).eos_token_id
    except (OSError, ValueError):
        pass
    try:
        return GenerationConfig.from_model_config(hf_config).eos_token_id
    except (AttributeError, TypeError, ValueError):
        return None


# -- the backend -----------------------------------------------------------------------------------
class VLLMBackend:
    """:class:`~constitutional_ai.backends.base.LanguageModel` over an in-process ``vllm.LLM``."""

    #: Engines alive in this process: the distributed state they share is torn down with the last.
    _live: ClassVar[int] = 0

    def __init__(self, config: ModelConfig):
        check_device(config.device)
        # vLLM logs every step of its start at INFO; our own errors say what failed. The variable is
        # read when vllm is imported and inherited by the engine's child process; a user's value wins.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            import vllm
        except ImportError:
            raise ModelLoadError(f"backend vllm needs the vllm package; {INSTALL_HINT}") from None
        except Exception as exc:  # a broken install (CUDA libraries, binary mismatch) fails in many ways
            raise ModelLoadError(f"the vllm package cannot be imported ({first_line(exc)}); {INSTALL_HINT}") from None
        if not torch.cuda.is_available():
            raise ModelLoadError(f"backend vllm needs a CUDA GPU and torch sees none here; {INSTALL_HINT}")
        tokens_prompt: Any
        try:
            from vllm.inputs import TokensPrompt as tokens_prompt
        except ImportError:  # moved in some releases; a TypedDict, so a plain dict is the same request
            tokens_prompt = dict
        from transformers import AutoConfig

        self.config = config
        name = config.model_name_or_path
        self.model_id = name
        path = locate_model(name, config.revision)
        local = Path(path).expanduser()
        if local.is_dir() and not any(local.glob("*.safetensors")):
            raise load_error(name, OSError("no safetensors weights"))
        with loading(name):
            self.tokenizer = load_tokenizer(path, config.revision, config.trust_remote_code)
            hf_config = AutoConfig.from_pretrained(
                path, revision=config.revision, trust_remote_code=config.trust_remote_code)
            model_eos = _model_eos(path, hf_config, config.revision)
        self.style: Literal["raw", "chat"] = prompt_style(self.tokenizer, config.chat_format, name)
        self.eos_token_ids = end_token_ids(model_eos, self.tokenizer.eos_token_id, self.tokenizer.get_vocab(),
                                           self.style == "chat")
        # the transformers backend pads with EOS when the tokenizer has no pad token
        self.pad_token_id: int | None = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                                         else self.tokenizer.eos_token_id)
        #: Strings that tokenize to control tokens: text from users or models must not smuggle them in.
        self.special_tokens: list[str] = control_strings(self.tokenizer)
        self.revision: str | None = getattr(hf_config, "_commit_hash", None)

        try:
            self.llm: Any = vllm.LLM(**engine_kwargs(config, path))
        except Exception as exc:  # vLLM raises whatever its loaders and workers raise
            raise engine_error(name, exc, config.gpu_memory_utilization) from None
        VLLMBackend._live += 1
        self._sampling_params: Any = vllm.SamplingParams
        self._tokens_prompt: Any = tokens_prompt
        #: The installed vLLM's value for "top-k disabled" (-1 in older releases, 0 in newer).
        self._top_k_off: int = vllm.SamplingParams().top_k
        self.context_length: int = config.max_context or self._engine_context_length(hf_config)

    def _engine_context_length(self, hf_config: Any) -> int:
        for owner in (getattr(self.llm, "llm_engine", None), self.llm):
            value = getattr(getattr(owner, "model_config", None), "max_model_len", None)
            if isinstance(value, int) and value > 0:
                return value
        return config_context_length(hf_config) or 2048

    # -- formatting ------------------------------------------------------------------------------
    def format(self, prompt: Prompt) -> str:
        """The exact text the model sees for a prompt."""
        return render(self.tokenizer, self.style, prompt, self.model_id)

    def _encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer(self.format(prompt), add_special_tokens=add_special(prompt, self.style))["input_ids"]

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        return [len(self._encode(p)) for p in prompts]

    # -- the engine ------------------------------------------------------------------------------
    def _check_fits(self, sequences: Sequence[Sequence[int]]) -> None:
        longest = max((len(s) for s in sequences), default=0)
        if longest > self.context_length:
            raise CAIError(f"a prompt of {longest} tokens does not fit {self.model_id!r}'s context of "
                           f"{self.context_length} tokens; shorten it or raise --max-context")

    def _run(self, sequences: Sequence[list[int]], sampling: Any, doing: str) -> list[Any]:
        if self.llm is None:
            raise CAIError(f"backend for {self.model_id!r} is closed")
        self._check_fits(sequences)
        requests = [self._tokens_prompt(prompt_token_ids=ids) for ids in sequences]
        try:
            return list(self.llm.generate(requests, sampling, use_tqdm=False))
        except torch.OutOfMemoryError:
            raise CAIError(f"out of memory {doing} with {self.model_id!r}; lower gpu_memory_utilization (now "
                           f"{self.config.gpu_memory_utilization}) or --max-context") from None
        except ValueError as exc:  # vLLM validates each request (length, token ids) before scheduling
            raise CAIError(f"vllm rejected a request {doing} with {self.model_id!r}: {first_line(exc)}") from None

    def _sampling(self, **kwargs: Any) -> Any:
        try:
            return self._sampling_params(**kwargs)
        except ValueError as exc:  # e.g. vLLM allows temperatures up to 2 only
            raise CAIError(f"vllm rejects these generation settings: {first_line(exc)}") from None

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: GenerationParams,
                 seeds: Sequence[int] | None = None) -> list[Generation]:
        if not prompts:
            return []
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError("generate needs one seed per prompt")
        encoded = [self._encode(p) for p in prompts]
        if seeds is None and not params.greedy:
            # as the transformers backend: a seed per prompt from torch's RNG, so torch.manual_seed
            # reproduces a run and a prompt's sample does not depend on its neighbours
            seeds = [int(torch.randint(0, 2**62, ())) for _ in prompts]
        sampling = [self._sampling(**sampling_kwargs(params, seeds[i] if seeds is not None else None,
                                                     self.eos_token_ids, self._top_k_off))
                    for i in range(len(prompts))]
        outputs = self._run(encoded, sampling, "generating")

        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        results = []
        for ids, out in zip(encoded, outputs, strict=True):
            completion = out.outputs[0]
            results.append(finish_generation(list(completion.token_ids), len(ids), self.eos_token_ids,
                                             self.pad_token_id, decode, params.stop,
                                             getattr(completion, "finish_reason", None)))
        return results

    # -- scoring ---------------------------------------------------------------------------------
    def score_choices(self, prompts: Sequence[Prompt], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        """Teacher-forced prompt log-probabilities, one engine request per (prompt, choice).

        vLLM computes prompt log-probabilities only for tokens it runs through the model, so it
        skips its prefix cache for these requests: each row's shared start is recomputed (fast
        kernels, but no reuse across choices as in the transformers backend's prefix tree).
        """
        if len(prompts) != len(choices):
            raise ValueError("score_choices needs one list of choices per prompt")
        texts = [self.format(p) for p in prompts]
        pairs = tokenize_choices(self.tokenizer, texts, [add_special(p, self.style) for p in prompts], choices)
        scores: list[list[float]] = [[0.0] * len(cs) for cs in choices]
        rows = [(i, j, ctx + cont, len(ctx)) for i, group in enumerate(pairs)
                for j, (ctx, cont) in enumerate(group) if cont]  # an empty continuation scores 0
        if not rows:
            return scores
        sampling = self._sampling(max_tokens=1, temperature=0.0, prompt_logprobs=PROMPT_LOGPROBS, detokenize=False)
        outputs = self._run([ids for _, _, ids, _ in rows], sampling, "scoring")
        for (i, j, ids, start), out in zip(rows, outputs, strict=True):
            scores[i][j] = continuation_logprob(out.prompt_logprobs, ids, start)
        return scores

    def close(self) -> None:
        engine, self.llm = getattr(self, "llm", None), None
        if engine is None:
            return
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        if core is not None:
            with suppress(Exception):  # v1 runs the engine in a child process: stop it now, not at exit
                core.shutdown()
        del engine, core
        VLLMBackend._live -= 1
        if VLLMBackend._live == 0:
            with suppress(Exception):  # absent or different in some releases; only frees memory
                from vllm.distributed import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
