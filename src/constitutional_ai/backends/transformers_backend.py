"""In-process Hugging Face transformers backend, the default.

Throughput on small hardware comes from batching: prompts are tokenized once, sorted by length
so each micro-batch carries little padding, left-padded, and generated together; each sequence
stops on its own at end-of-sequence or a stop string. Scoring is the prefix-tree scorer's
(:mod:`~constitutional_ai.backends.prefix_scorer`) over the token ids tokenized here.
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch
from transformers import LogitsProcessorList

from constitutional_ai.backends.base import Generation, cut_at_stop
from constitutional_ai.backends.kv_reuse import (
    MIN_OWN,
    MIN_REUSE,
    Entry,
    KVStore,
    full_attention,
    plain_layers,
    shared_starts,
)
from constitutional_ai.backends.prefix_scorer import Pair, PrefixTreeScorer, common_length
from constitutional_ai.backends.sampling import SeededSampler
from constitutional_ai.common.chat_format import render_raw
from constitutional_ai.common.errors import CAIError, DataError, ModelLoadError, first_line
from constitutional_ai.common.types import Prompt
from constitutional_ai.config import GenerationParams, ModelConfig
from constitutional_ai.models import cpu_linear
from constitutional_ai.models.loading import (
    config_context_length,
    control_strings,
    end_token_ids,
    load_tokenizer,
    loading,
    locate_model,
    prompt_style,
    resolve_device,
    resolve_dtype,
)

#: How many recently counted prompts keep their token ids for scoring (two labeller calls' worth).
COUNTED_PROMPTS = 512


class TransformersBackend:
    """:class:`~constitutional_ai.backends.base.LanguageModel` over ``AutoModelForCausalLM``."""

    def __init__(self, config: ModelConfig, model: Any = None, tokenizer: Any = None):
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.config = config
        name = config.model_name_or_path
        self.model_id = name
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        path = locate_model(name, config.revision)
        with loading(name):
            self.tokenizer = tokenizer or load_tokenizer(path, config.revision, config.trust_remote_code)
            self.model = model or AutoModelForCausalLM.from_pretrained(
                path, revision=config.revision, trust_remote_code=config.trust_remote_code,
                dtype=self.dtype, use_safetensors=True)
        try:
            self.model.to(self.device)
        except (RuntimeError, AssertionError) as exc:
            raise ModelLoadError(f"model {name!r} cannot be moved to device {self.device} ({first_line(exc)}); "
                                 "choose another --device (auto, cpu, cuda, cuda:N, mps)") from None
        self.model.eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.style: Literal["raw", "chat"] = prompt_style(self.tokenizer, config.chat_format, name)
        self.context_length = config.max_context or self._read_context_length()
        self.eos_token_ids = end_token_ids(self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id,
                                           self.tokenizer.get_vocab(), self.style == "chat")
        #: Strings that tokenize to control tokens: text from users or models must not smuggle them in.
        self.special_tokens: list[str] = control_strings(self.tokenizer)
        self.revision = getattr(self.model.config, "_commit_hash", None)
        #: Scores choices; a model handed in (a policy being trained) keeps its attention implementation.
        self.scorer = PrefixTreeScorer(
            self.model, self.tokenizer.pad_token_id, self.device, batch_size=config.batch_size,
            max_batch_tokens=config.max_batch_tokens, prefix_cache_tokens=config.prefix_cache_tokens,
            install_stem_attention=model is None)
        self._rust_ids_agree: bool | None = None
        #: Token ids of the prompts counted last (text, add_special) -> ids: a labeller counts each
        #: question to fit it to the context, then scores it, and a thousand-token few-shot
        #: question need not be tokenized twice.
        self._counted: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()
        self._generate_cache_kw = "cache"
        if model is None and self.device.type == "cpu":
            cpu_linear.install(self.model)  # decoding's few-row products, the faster way round
        #: KV of recent prompts and completions, so a prompt extending one prefills only its new tokens.
        #: Only on a model loaded here: one handed in may be a policy whose weights an optimiser moves.
        self.kv_store: KVStore | None = (KVStore(config.generation_cache_tokens)
                                         if config.generation_cache_tokens and model is None
                                         and full_attention(self.model) else None)
        # The model's own generation_config.json may carry sampling defaults (min_p, a repetition
        # penalty, top-k...) that transformers would silently apply to every knob we leave unset;
        # our GenerationParams are the whole truth, so start from a config with token ids only.
        self.model_generation_defaults = self.model.generation_config
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.eos_token_ids or None,
            pad_token_id=self.tokenizer.pad_token_id)

    @property
    def fuse_suffixes(self) -> bool:
        """Whether the attention kernel takes a custom 4D mask, so choices can share one row in scoring."""
        return self.scorer.fuse_suffixes

    @property
    def shared_stem_attention(self) -> bool:
        """Whether scoring attends to shared stems in place (no per-row KV copies): CPU sdpa models."""
        return self.scorer.shared_stem_attention

    def _read_context_length(self) -> int:
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        return config_context_length(self.model.config) or (
            tok_max if isinstance(tok_max, int) and tok_max < 10**7 else 2048)

    # -- formatting ------------------------------------------------------------------------------
    def format(self, prompt: Prompt) -> str:
        """The exact text the model sees for a prompt."""
        if isinstance(prompt, str):
            return prompt
        if self.style == "raw":
            return render_raw(prompt, add_generation_prompt=True)
        try:
            return self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja's TemplateError and friends, raised by the model's own template
            raise DataError(f"model {self.model_id!r}: its chat template rejects this conversation "
                            f"({first_line(exc)}); fix the prompt's roles or use --chat-format raw") from None

    def _add_special(self, prompt: Prompt) -> bool:
        # A chat template writes its own special tokens; raw text gets the tokenizer's BOS.
        return isinstance(prompt, str) or self.style == "raw"

    def _encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer(self.format(prompt), add_special_tokens=self._add_special(prompt))["input_ids"]

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        keys = [(self.format(p), self._add_special(p)) for p in prompts]
        ids = self._batch_ids([text for text, _ in keys], [flag for _, flag in keys])
        for key, row in zip(keys, ids, strict=True):
            self._counted[key] = row
            self._counted.move_to_end(key)
        while len(self._counted) > COUNTED_PROMPTS:
            self._counted.popitem(last=False)
        return [len(row) for row in ids]

    # -- generation ------------------------------------------------------------------------------
    def _gen_config(self, params: GenerationParams) -> Any:
        from transformers import GenerationConfig

        # Decoding is greedy as far as transformers knows: sampling happens in SeededSampler, so
        # that every prompt draws from its own seed and batching cannot change what it samples.
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.eos_token_ids or None,
        }
        if params.stop:
            kwargs["stop_strings"] = list(params.stop)
        if self.device.type == "cpu":
            # A preallocated KV cache spares the per-token concatenation that dominates small
            # models on CPU (about 7% of a critique run); GPUs keep the default dynamic cache.
            kwargs["cache_implementation"] = "static"
        return GenerationConfig(**kwargs)

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams,
                 seeds: Sequence[int] | None = None) -> list[Generation]:
        try:
            return self._generate(prompts, params, seeds)
        except torch.OutOfMemoryError:
            raise CAIError(f"out of memory generating with {self.model_id!r}; lower --model-batch-size "
                           f"(now {self.config.batch_size}) or --max-new-tokens") from None

    @torch.inference_mode()
    def _generate(self, prompts: Sequence[Prompt], params: GenerationParams,
                  seeds: Sequence[int] | None) -> list[Generation]:
        if not prompts:
            return []
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError("generate needs one seed per prompt")
        encoded = [self._encode(p) for p in prompts]
        store = self._usable_store()
        if store is not None:
            for start in shared_starts(encoded, store):
                self._store_start(store, start)
        # (entry, tokens) of each prompt's longest stored start; every prompt keeps MIN_OWN tokens of its
        # own, so that stop strings looking back past the completion see the prompt's real last tokens
        matches = [store.match(ids, len(ids) - MIN_OWN) if store is not None else (None, 0) for ids in encoded]
        # longest remainder first, so each micro-batch carries little padding
        order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i]) - matches[i][1]))
        gen_config = self._gen_config(params)
        if store is not None:
            gen_config.return_dict_in_generate = True  # for the cache, to store what was computed
        reuse_config = copy.copy(gen_config)  # the cache is handed in: transformers must not make its own
        reuse_config.cache_implementation = None
        out: list[Generation | None] = [None] * len(prompts)
        bs = self.config.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            processors = None
            if not params.greedy:
                row_seeds = [seeds[i] if seeds is not None else int(torch.randint(0, 2**62, ())) for i in idx]
                processors = LogitsProcessorList([SeededSampler(params, row_seeds)])
            inputs, cache, columns = self._batch_inputs([encoded[i] for i in idx], [matches[i] for i in idx],
                                                        params.max_new_tokens)
            result = self._run_generate(inputs, gen_config if cache is None else reuse_config, processors,
                                        self.tokenizer if params.stop else None, cache)
            sequences = result.sequences if store is not None else result
            width = inputs["input_ids"].shape[1]
            new_tokens = sequences[:, width:].tolist()
            for row, i in enumerate(idx):
                tokens = new_tokens[row]
                n, hit_eos = len(tokens), False
                for pos, tok in enumerate(tokens):
                    if tok in self.eos_token_ids:
                        n, hit_eos = pos, True
                        break
                if not hit_eos:
                    while n and tokens[n - 1] == self.tokenizer.pad_token_id:
                        n -= 1
                text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
                text, hit_stop = cut_at_stop(text, params.stop)
                out[i] = Generation(text=text, finish_reason="stop" if hit_eos or hit_stop else "length",
                                    prompt_tokens=len(encoded[i]), completion_tokens=n)
            if store is not None:
                self._store_rows(store, getattr(result, "cache", None) or result.past_key_values, width, columns,
                                 [(encoded[i], *matches[i], new_tokens[row]) for row, i in enumerate(idx)])
        return [g for g in out if g is not None]

    # -- KV reuse across generations ---------------------------------------------------------------
    def _run_generate(self, inputs: dict[str, torch.Tensor], gen_config: Any, processors: Any, tokenizer: Any,
                      cache: Any) -> Any:
        kwargs = dict(inputs, generation_config=gen_config, logits_processor=processors, tokenizer=tokenizer)
        if cache is None:
            return self.model.generate(**kwargs)
        # transformers 5.x renamed generate's past_key_values to cache (the old name goes in 6.0); an
        # earlier 5.x rejects the new name as an unused model kwarg before generating anything
        if self._generate_cache_kw == "cache":
            try:
                return self.model.generate(**kwargs, cache=cache)
            except ValueError as exc:
                if "cache" not in str(exc):
                    raise
                self._generate_cache_kw = "past_key_values"
        return self.model.generate(**kwargs, past_key_values=cache)

    @property
    def _cache_arg(self) -> str:
        # the forward pass's name for the cache (past_key_values in Llama's forward up to 5.x)
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _usable_store(self) -> KVStore | None:
        if self.kv_store is None:
            return None
        self.kv_store.check_weights(self.model)
        return self.kv_store

    def _store_start(self, store: KVStore, ids: list[int]) -> None:
        """Compute a start several prompts share (a few-shot block) once, into the store."""
        entry, m = store.match(ids, len(ids) - 1)
        inputs, cache, _ = self._batch_inputs([ids], [(entry, m)], 0)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        ids_t, mask = inputs["input_ids"], inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, cache.get_seq_length():]
        out = self.model(input_ids=ids_t[:, cache.get_seq_length():], attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        fresh = getattr(out, "cache", None) or out.past_key_values
        layers = plain_layers(fresh)
        if layers is None:
            self.kv_store = None  # not plain per-token K/V: no reuse with this model
            return
        store.put(ids, entry, m, [(layer.keys[:, :, m:len(ids)].clone(), layer.values[:, :, m:len(ids)].clone())
                                  for layer in layers])

    def _batch_inputs(self, encoded: list[list[int]], matches: list[tuple[Entry | None, int]],
                      max_new_tokens: int) -> tuple[dict[str, torch.Tensor], Any, list[list[int]]]:
        """Model inputs for one micro-batch, the KV cache holding each row's stored start (``None``
        when no row has one), and per row the columns of its own tokens (stored start, then prompt).

        Layout: stored starts right-aligned in the first ``M`` columns, each row's remaining prompt
        tokens right-aligned in the next ``S``, masked holes between; positions follow the mask, so
        each token sits at the position it has in its own sequence.
        """
        pad = self.tokenizer.pad_token_id
        reused = [m for _, m in matches]
        cached = max(reused)
        rest = max(len(ids) - m for ids, m in zip(encoded, reused, strict=True))
        width = cached + rest
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        columns = []
        for r, (seq, m) in enumerate(zip(encoded, reused, strict=True)):
            own = len(seq) - m
            ids[r, cached - m:cached] = torch.tensor(seq[:m], dtype=torch.long)
            ids[r, width - own:] = torch.tensor(seq[m:], dtype=torch.long)
            mask[r, cached - m:cached] = 1
            mask[r, width - own:] = 1
            columns.append([*range(cached - m, cached), *range(width - own, width)])
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self.kv_store is not None:
            self.kv_store.reused += sum(reused)
            self.kv_store.computed += sum(len(s) for s in encoded) - sum(reused)
        if cached < MIN_REUSE:
            return inputs, None, columns
        first = next(entry for entry, _ in matches if entry is not None)
        layers = []
        for layer, (k0, v0) in enumerate(first.own):
            keys = k0.new_zeros((len(encoded), k0.shape[1], cached, k0.shape[3]))
            values = v0.new_zeros((len(encoded), v0.shape[1], cached, v0.shape[3]))
            for r, (entry, m) in enumerate(matches):
                col = cached - m
                for kv, a, b in entry.pieces(m) if entry is not None else ():
                    keys[r, :, col:col + b - a] = kv[layer][0][0, :, a:b]
                    values[r, :, col:col + b - a] = kv[layer][1][0, :, a:b]
                    col += b - a
            layers.append((keys, values))
        return inputs, self._cache_of(layers, cached + rest + max_new_tokens), columns

    def _cache_of(self, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> Any:
        """A cache holding ``layers``: preallocated on CPU (as :meth:`_gen_config` asks), else dynamic."""
        from transformers import DynamicCache, StaticCache

        if self.device.type != "cpu":
            return DynamicCache(ddp_cache_data=layers, config=self.model.config)
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        for layer, (keys, values) in enumerate(layers):
            cache.update(keys, values, layer)
        return cache

    def _store_rows(self, store: KVStore, cache: Any, width: int, columns: list[list[int]],
                    rows: list[tuple[list[int], Entry | None, int, list[int]]]) -> None:
        """Keep each row's prompt and completion (their KV, without padding) for later prompts."""
        layers = plain_layers(cache)
        if layers is None:
            self.kv_store = None  # not plain per-token K/V: no reuse with this model
            return
        for r, ((ids, entry, m, new), cols) in enumerate(zip(rows, columns, strict=True)):
            fed = new[:-1]  # the last generated token was never fed back
            n = len(fed)
            while n and (fed[n - 1] == self.tokenizer.pad_token_id or fed[n - 1] in self.eos_token_ids):
                n -= 1
            index = torch.tensor(cols[m:] + list(range(width, width + n)), device=self.device)
            own = [(layer.keys[r:r + 1].index_select(2, index), layer.values[r:r + 1].index_select(2, index))
                   for layer in layers]
            store.put(ids + fed[:n], entry, m, own)

    # -- scoring ---------------------------------------------------------------------------------
    def _batch_ids(self, strings: list[str], flags: list[bool]) -> list[list[int]]:
        """Token ids of many strings in one call. Straight from the Rust tokenizer when it gives the
        same ids as the Python wrapper (checked once): the wrapper's per-string conversion cost
        as much as the encoding itself on long few-shot prompts."""
        if not strings:
            return []
        if len(set(flags)) > 1:
            return [self.tokenizer(x, add_special_tokens=f)["input_ids"] for x, f in zip(strings, flags, strict=True)]
        fast = getattr(self.tokenizer, "backend_tokenizer", None)
        if fast is not None and self._rust_ids_agree is None:
            probe = self.tokenizer(strings[0], add_special_tokens=flags[0])["input_ids"]
            self._rust_ids_agree = fast.encode(strings[0], add_special_tokens=flags[0]).ids == probe
        if fast is not None and self._rust_ids_agree:
            return [e.ids for e in fast.encode_batch(strings, add_special_tokens=flags[0])]
        return self.tokenizer(strings, add_special_tokens=flags[0])["input_ids"]

    def _tokenize_choices(self, prompts: Sequence[Prompt],
                          choices: Sequence[Sequence[str]]) -> list[list[Pair]]:
        """Per prompt, per choice: the token ids of the prompt and of the continuation, tokenized
        together as the model reads them (two batched tokenizer calls for the whole request).

        Where the prompt's last token merges with the choice's first, the split falls at the longest
        common prefix, so the merged token is scored as part of the continuation.
        """
        texts = [self.format(p) for p in prompts]
        special = [self._add_special(p) for p in prompts]
        flat = [(t, c, sp) for t, cs, sp in zip(texts, choices, special, strict=True) for c in cs]

        known = [self._counted.get((t, sp)) for t, sp in zip(texts, special, strict=True)]
        missing = [i for i, row in enumerate(known) if row is None]
        for i, row in zip(missing, self._batch_ids([texts[i] for i in missing], [special[i] for i in missing]),
                          strict=True):
            known[i] = row
        contexts: list[list[int]] = known  # type: ignore[assignment]
        fulls = iter(self._batch_ids([t + c for t, c, _ in flat], [sp for _, _, sp in flat]))
        out = []
        for context, cs in zip(contexts, choices, strict=True):
            pairs = []
            for _ in cs:
                full = next(fulls)
                common = common_length(context, full)
                if common == 0:
                    raise ValueError("score_choices needs a non-empty prompt")
                pairs.append((full, []) if common == len(full) else (full[:common], full[common:]))
            out.append(pairs)
        return out

    def score_choices(self, prompts: Sequence[Prompt], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        if len(prompts) != len(choices):
            raise ValueError("score_choices needs one list of choices per prompt")
        try:
            return self.scorer.score(self._tokenize_choices(prompts, choices))
        except torch.OutOfMemoryError:
            raise CAIError(f"out of memory scoring with {self.model_id!r}; lower --model-batch-size "
                           f"(now {self.config.batch_size})") from None

    def clear_prefix_cache(self) -> None:
        """Forget the stems stored for scoring (see :class:`PrefixTreeScorer`)."""
        self.scorer.clear_prefix_cache()

    def close(self) -> None:
        self.model = None
        self.kv_store = None
        self.scorer.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
