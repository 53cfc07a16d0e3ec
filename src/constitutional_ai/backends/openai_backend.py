"""Any server that speaks the OpenAI API: vLLM's and SGLang's servers, llama.cpp, Ollama, hosted APIs.

Teams already run these engines; we drive them rather than write our own. Requests go out
concurrently (asyncio, up to ``max_concurrency`` in flight) through the official ``openai`` SDK,
and each one is retried on 429, 5xx, timeouts, dropped connections and malformed replies, with
exponential back-off, full jitter and the server's ``Retry-After``. A stage therefore sees every
prompt answered exactly once, in order, however flaky the server; the record store then makes the
run itself resumable.

What the SDK (``AsyncOpenAI``, openai 3.x) does for us: building the chat and completions requests
(``extra_body`` carries the server-specific fields), the per-request ``timeout``, the retry loop
(``max_retries``; it re-sends after timeouts, connection errors and the statuses it is told to
retry, reading ``retry-after-ms``, ``Retry-After`` seconds and HTTP dates), and the connection
pool, whose ``max_connections`` is our concurrency limit. What stays
ours, and why (facts from the SDK's ``_base_client.py``):

* **Which statuses to retry** (``_AsyncOpenAI._should_retry``). The SDK retries 408, 409, 429 and
  every status from 500 on, and refuses to retry at all when ``Retry-After`` asks for more than
  ``MAX_RETRY_AFTER_DELAY`` (120 s): a rate limit with a long ``Retry-After`` would end a stage.
  We retry :data:`RETRY_STATUSES` (425 and 529 too, not a permanent 501) and wait the capped time.
* **How long to wait** (``_AsyncOpenAI._calculate_retry_timeout``, :func:`backoff_seconds`,
  :func:`retry_after_seconds`). The SDK's back-off is ``0.5 * 2^n`` capped at 8 s and jittered
  only by 0-25 %, so the requests of a batch that failed together retry together against a
  self-hosted server, and it backs off instead of honouring ``Retry-After: 0``. We use full
  jitter (uniform in ``[0, min(30 s, 0.5 * 2^n)]``) and honour any ``Retry-After``, capped at
  120 s. Both methods are what the SDK's retry loop calls to decide, with the same signatures in
  openai 3.0 and 3.57; they are private, hence the ``openai<4`` pin.
* **Retrying a malformed 2xx reply** (``_HTTPClient.send``). The SDK decodes the body only after
  its retry loop (``response.json()`` in ``_response.py``), so a truncated JSON body raises
  ``JSONDecodeError`` with no retry, and a body of another content type comes back as a string. Our HTTP client
  checks each 2xx body inside the loop and turns a bad one into a transport error
  (``httpx2.DecodingError``), which the SDK retries like a dropped connection.
* **Per-attempt statistics** (``_HTTPClient.send``): the SDK counts nothing, and only the HTTP
  client sees every attempt and why it failed.
* **Error text** (:meth:`OpenAIBackend._json`). The SDK's ``APIStatusError`` message embeds the
  reply body, which may echo the key; ours is one line with the key scrubbed, names the variable
  for 401/403 and says how many attempts were spent.
* **Where credentials come from.** Without an explicit value the SDK reads ``OPENAI_API_KEY``,
  ``OPENAI_ADMIN_KEY``, ``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID`` and an ``Authorization`` in
  ``OPENAI_CUSTOM_HEADERS`` from the environment and would send them to whatever server
  ``base_url`` names, and it refuses to run without some key. The key is read from the variable
  the config names, and each request carries it as its own ``Authorization`` header (or omits
  that header), which the SDK merges over everything else; the organisation and project headers
  are omitted.

``score_choices`` needs log-probabilities, which servers offer in one of two ways:

* **echo** (``/completions`` with ``echo`` and ``logprobs``, as lm-evaluation-harness uses): the
  log-probability of every prompt token, so the continuation's exact sum is read off by character
  offset. vLLM, SGLang and llama.cpp's Python server give it.
* **top_logprobs**: only the next token's top candidates. The prompt is extended by what the
  choices share and each choice is scored by its first distinct token; later tokens are ignored,
  and a choice outside the top candidates gets the lowest listed value (an upper bound).

The API key is sent only in the ``Authorization`` header, and never appears in a log line, an
error or an artifact.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from typing import Any, Literal

import httpx2
import openai

from constitutional_ai.backends.base import Generation, cut_at_stop
from constitutional_ai.common.chat_format import render_raw
from constitutional_ai.common.errors import CAIError, ModelLoadError, first_line
from constitutional_ai.common.types import Prompt
from constitutional_ai.config import EMBEDDED_MODEL, GenerationParams, ModelConfig, redact_url

log = logging.getLogger(__name__)

#: Statuses worth another try: rate limits, overload and server-side failures.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
#: Back-off: the first retry waits up to BASE seconds, doubling per attempt, never more than CAP.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
#: A server asking for more than this is answered with this (a stage should not sleep for hours).
MAX_RETRY_AFTER = 120.0
#: Candidates asked for in top_logprobs mode (OpenAI's chat API allows at most 20).
TOP_LOGPROBS = 20
#: Context length assumed when neither the config nor the server says.
DEFAULT_CONTEXT = 4096
#: Given to the SDK only to pass its credential check when there is no key; never sent.
_NO_KEY = "no-key"


class ServerError(CAIError):
    """A request failed for good: a 4xx the server will repeat, or retries exhausted."""


class ScoringUnsupportedError(CAIError):
    """The server returns neither prompt log-probabilities nor top candidates."""


def retry_after_seconds(headers: Any, now: float | None = None) -> float | None:
    """The wait a 429/503 asks for: ``retry-after-ms``, ``Retry-After`` in seconds or as an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return min(MAX_RETRY_AFTER, max(0.0, float(ms) / 1000))
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, when - (time.time() if now is None else now)))


def backoff_seconds(attempt: int, rng: random.Random) -> float:
    """Exponential back-off with full jitter (AWS's recipe): uniform in [0, min(cap, base * 2^attempt)],
    so many clients that failed together do not retry together."""
    return rng.uniform(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** attempt))


def continuation_logprob(logprobs: dict[str, Any], start: int, end: int, echoed: str | None = None,
                         generated_tokens: int | None = None) -> float:
    """Sum of the echoed token log-probabilities whose text overlaps ``[start, end)``.

    ``start`` is where the choice begins in the echoed text; a token that straddles it (the prompt's
    end merged with the choice's start) counts as the choice's, as in the transformers backend.
    Tokens from ``end`` on are the one generated token and are left out. Some servers (llama.cpp's
    Python server) count special tokens as empty text in ``text_offset``, so when the offsets do not
    add up to ``echoed`` (the reply's text) the tokens are walked back from the prompt's last token
    instead: the reply's last ``generated_tokens`` (its usage's ``completion_tokens``) are dropped,
    or, without usage, as many characters as the generated text has.
    """
    tokens = logprobs.get("tokens")
    values = logprobs.get("token_logprobs")
    offsets = logprobs.get("text_offset")
    if not tokens or values is None or offsets is None or len(offsets) != len(tokens) or len(values) != len(tokens):
        raise ScoringUnsupportedError("the reply carries no per-token prompt log-probabilities")
    if echoed is not None and offsets[-1] + len(tokens[-1]) != len(echoed):
        if generated_tokens is not None and 0 <= generated_tokens < len(tokens):
            kept = len(tokens) - generated_tokens
            return _logprob_from_end(tokens[:kept], values[:kept], 0, end - start)
        return _logprob_from_end(tokens, values, len(echoed) - end, end - start)
    total, seen = 0.0, False
    for i, (tok, value, offset) in enumerate(zip(tokens, values, offsets, strict=True)):
        if offset >= end:
            break
        token_end = offsets[i + 1] if i + 1 < len(offsets) else offset + len(tok)
        if token_end <= start:
            continue
        if value is None:  # the first token of the text has no log-probability
            raise ScoringUnsupportedError("the choice starts at the first token, which has no log-probability")
        total += float(value)
        seen = True
    if not seen:
        raise ScoringUnsupportedError("the echoed tokens do not cover the choice (the server ignored echo)")
    return total


def _logprob_from_end(tokens: Sequence[str], values: Sequence[float | None], generated: int, length: int) -> float:
    """Skip ``generated`` characters of tokens from the end, then sum tokens covering ``length`` more."""
    pos = len(tokens) - 1
    while generated > 0 and pos >= 0:
        generated -= len(tokens[pos])
        pos -= 1
    total, need = 0.0, length
    while need > 0 and pos >= 0:
        if values[pos] is None:
            raise ScoringUnsupportedError("the choice starts at the first token, which has no log-probability")
        total += float(values[pos])  # type: ignore[arg-type]
        need -= len(tokens[pos])
        pos -= 1
    if need > 0:
        raise ScoringUnsupportedError("the echoed tokens do not cover the choice (the server ignored echo)")
    return total


def shared_prefix(texts: Sequence[str]) -> str:
    """The longest start every choice shares (``The answer is: (`` for ``(A)``/``(B)`` replies)."""
    if not texts:
        return ""
    return os.path.commonprefix(list(texts))  # noqa: RUF071 - characters, not paths


def first_token_scores(top: dict[str, float], remainders: Sequence[str]) -> list[float]:
    """Score each choice by the best top candidate that starts it (longest match), else the floor."""
    floor = min(top.values()) if top else -1e4
    scores = []
    for rest in remainders:
        best: tuple[int, float] | None = None
        for token, value in top.items():
            if token and rest.startswith(token) and (best is None or len(token) > best[0]):
                best = (len(token), value)
        scores.append(best[1] if best is not None else floor)
    return scores


class _MalformedReplyError(httpx2.DecodingError):
    """A 2xx reply whose body is not the JSON asked for; a transport error so that the SDK retries it."""


def _failure_reason(exc: BaseException) -> str:
    """Why one attempt failed, as the statistics and the give-up message name it."""
    if isinstance(exc, _MalformedReplyError):
        return str(exc)
    if isinstance(exc, httpx2.TimeoutException):
        return "timeout"
    return f"connection ({type(exc).__name__})"  # refused, reset, dropped mid-reply


def _malformed(request: httpx2.Request, response: httpx2.Response) -> str | None:
    """What is wrong with a 2xx body, or None. A completion must carry ``choices`` (a proxy's error
    object sent with 200 is as useless as a truncated body)."""
    try:
        body = response.json()
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return "malformed JSON"
    if request.url.path.endswith("/completions") and not (isinstance(body, dict) and "choices" in body):
        return "reply without 'choices'"
    return None


class _HTTPClient(openai.DefaultAsyncHttpxClient):
    """The SDK's HTTP client; it sees each attempt the SDK's retry loop makes, so it counts them and
    rejects a malformed 2xx body there, where a rejection is still retried."""

    def __init__(self, stats: Counter[str], **kwargs: Any):
        super().__init__(**kwargs)
        self.stats = stats

    async def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:  # type: ignore[override]
        self.stats["requests"] += 1
        try:
            response = await super().send(request, **kwargs)
        except Exception as exc:
            self.stats[f"retry: {_failure_reason(exc)}"] += 1
            raise
        if response.status_code in RETRY_STATUSES:
            self.stats[f"retry: HTTP {response.status_code}"] += 1
        elif response.is_success and not kwargs.get("stream"):
            problem = _malformed(request, response)
            if problem is not None:
                self.stats[f"retry: {problem}"] += 1
                await response.aclose()
                raise _MalformedReplyError(problem, request=request)
        return response


class _AsyncOpenAI(openai.AsyncOpenAI):
    """``AsyncOpenAI`` running our retry policy in its own retry loop (see the module docstring)."""

    rng: random.Random

    def _should_retry(self, response: httpx2.Response) -> bool:
        return response.status_code in RETRY_STATUSES

    def _calculate_retry_timeout(self, remaining_retries: int, options: Any,
                                 response_headers: httpx2.Headers | None = None) -> float:
        wait = None if response_headers is None else retry_after_seconds(response_headers)
        if wait is not None:
            return wait
        return backoff_seconds(options.get_max_retries(self.max_retries) - remaining_retries, self.rng)


class OpenAIBackend:
    """:class:`~constitutional_ai.backends.base.LanguageModel` over an OpenAI-compatible HTTP server."""

    def __init__(self, config: ModelConfig):
        self.config = config
        assert config.base_url is not None  # ModelConfig refuses backend openai without one
        self.base_url = config.base_url.rstrip("/")
        self.shown_url = redact_url(self.base_url)  # what messages and logs may show
        self._key = os.environ.get(config.api_key_env) or None
        #: Requests, retries by reason and failures, for the run summary and the benchmarks.
        self.stats: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cai-openai", daemon=True)
        self._thread.start()
        self._client = self._sdk_client(config)
        #: Sent with every request: a request's own headers win over all the SDK derives from the environment.
        self._auth: dict[str, Any] = {"Authorization": f"Bearer {self._key}" if self._key else openai.omit}
        self._tokenize_route: str | None = None
        self._scoring: Literal["echo", "top_logprobs"] | None = (
            None if config.logprobs_mode == "auto" else config.logprobs_mode)
        self._tokenizer = self._load_tokenizer(config)
        models = self._models()
        served = [m.get("id") for m in models if isinstance(m, dict) and m.get("id")]
        name = config.model_name_or_path
        if name == EMBEDDED_MODEL or not name:
            if not served:
                raise ModelLoadError(f"{self.shown_url}/models lists no model; pass the served name with --model")
            name = served[0]
        self.model_id = name
        self.revision = None
        has_template = self._tokenizer is not None and getattr(self._tokenizer, "chat_template", None) is not None
        self.style: Literal["raw", "chat"] = "raw" if config.chat_format == "raw" else "chat"
        if config.chat_format == "auto" and self._tokenizer is not None and not has_template:
            self.style = "raw"
        self._local_template = self.style == "chat" and has_template
        self.context_length = config.max_context or self._context_from(models, name)

    # -- set-up ----------------------------------------------------------------------------------
    def _sdk_client(self, config: ModelConfig) -> _AsyncOpenAI:
        n = config.max_concurrency
        # The pool's size is the concurrency limit; a request waiting for a connection has not been
        # sent, so that wait is not timed (pool=None).
        http = _HTTPClient(self.stats, limits=httpx2.Limits(max_connections=n, max_keepalive_connections=n))
        client = _AsyncOpenAI(
            api_key=self._key or _NO_KEY, base_url=self.base_url, max_retries=config.max_retries,
            timeout=openai.Timeout(config.request_timeout, pool=None), http_client=http,
            default_headers={"OpenAI-Organization": openai.omit, "OpenAI-Project": openai.omit})  # type: ignore[dict-item]
        client.rng = random.Random(0)
        return client

    @staticmethod
    def _load_tokenizer(config: ModelConfig) -> Any:
        if not config.tokenizer:
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(config.tokenizer, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"tokenizer {config.tokenizer!r}: cannot be loaded ({first_line(exc)}); pass the "
                                 "served model's tokenizer directory with --tokenizer") from None

    def _models(self) -> list[dict[str, Any]]:
        try:
            reply = self._run(self._json(self._client.models.with_raw_response.list(extra_headers=self._auth)))
        except ServerError as exc:
            raise ModelLoadError(f"{self.shown_url}: no OpenAI-compatible server answers ({exc}); start it or fix "
                                 "--base-url") from None
        data = reply.get("data") if isinstance(reply, dict) else None
        return data if isinstance(data, list) else []

    @staticmethod
    def _context_from(models: list[dict[str, Any]], name: str) -> int:
        for m in models:
            if m.get("id") != name:
                continue
            for key in ("max_model_len", "context_length", "max_context_length"):
                if isinstance(m.get(key), int) and m[key] > 0:
                    return int(m[key])
            meta = m.get("meta")
            if isinstance(meta, dict) and isinstance(meta.get("n_ctx"), int):
                return int(meta["n_ctx"])
        log.warning("the server does not report its context length; assuming %d tokens (set --max-context)",
                    DEFAULT_CONTEXT)
        return DEFAULT_CONTEXT

    # -- transport -------------------------------------------------------------------------------
    def _run(self, coro: Awaitable[Any]) -> Any:
        """Run a coroutine on the backend's own loop thread, so callers stay synchronous and a
        caller that is itself inside an event loop (a notebook) still works."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    async def _json(self, call: Awaitable[Any]) -> Any:
        """The JSON reply of one SDK call (the SDK has run the retries), or a one-line :class:`ServerError`."""
        try:
            reply = await call
        except openai.APIStatusError as exc:
            if exc.status_code not in RETRY_STATUSES:
                raise ServerError(self._describe(redact_url(str(exc.request.url)), exc.status_code,
                                                 exc.response)) from None
            url, reason = redact_url(str(exc.request.url)), f"HTTP {exc.status_code}"
        except openai.APIConnectionError as exc:  # timeouts too
            url, reason = redact_url(str(exc.request.url)), _failure_reason(exc.__cause__ or exc)
        else:
            response = reply if isinstance(reply, httpx2.Response) else reply.http_response
            return response.json()  # valid: _HTTPClient checked it
        self.stats["failed"] += 1
        raise ServerError(f"{url}: gave up after {self.config.max_retries + 1} attempts (last: {reason}); check "
                          "the server or raise --max-retries / --request-timeout")

    def _describe(self, url: str, status: int, response: Any) -> str:
        try:
            body = response.json()
            detail = body.get("error", body) if isinstance(body, dict) else body
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
        except ValueError:
            detail = response.text
        text = " ".join(str(detail).split())[:300]
        if self._key:
            text = text.replace(self._key, "***")
        if status in (401, 403):
            return (f"{url}: HTTP {status} ({text}); put the server's API key in the environment variable "
                    f"{self.config.api_key_env} (--api-key-env names another)")
        return f"{url}: HTTP {status}: {text}"

    def _gather(self, coros: list[Awaitable[Any]]) -> list[Any]:
        async def all_of() -> list[Any]:
            return list(await asyncio.gather(*coros))

        return self._run(all_of())

    # -- formatting ------------------------------------------------------------------------------
    def _text(self, prompt: Prompt) -> str | None:
        """The exact text for /completions, or None when only the server can render it (chat)."""
        if isinstance(prompt, str):
            return prompt
        if self.style == "raw":
            return render_raw(prompt, add_generation_prompt=True)
        if self._local_template:
            return self._tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        return None

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        if self._tokenizer is not None:
            out = []
            for p in prompts:
                text = self._text(p)
                if text is None:
                    text = render_raw(p)
                out.append(len(self._tokenizer(text, add_special_tokens=self.style == "raw")["input_ids"]))
            return out
        if not prompts:
            return []
        first = [self._run(self._count_remote(prompts[0]))]  # finds the server's tokenize route once
        return first + self._gather([self._count_remote(p) for p in prompts[1:]])

    async def _count_remote(self, prompt: Prompt) -> int:
        text = self._text(prompt)
        if text is None:  # a chat prompt the server templates: its contents plus a few tokens per turn
            text = "".join(m["content"] for m in prompt)  # type: ignore[index,union-attr]
            extra = 8 * len(prompt)
        else:
            extra = 0
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        routes = [self._tokenize_route] if self._tokenize_route else [
            "/tokenize", "/extras/tokenize", "root:/tokenize", "root:/extras/tokenize"]
        for route in routes:
            if route == "estimate":
                break
            url_base = root if route.startswith("root:") else self.base_url
            path = route.removeprefix("root:")
            try:  # each server names the text differently: vLLM prompt, llama.cpp content, its Python server input
                body = {"model": self.model_id, "prompt": text, "input": text, "content": text}
                reply = await self._json(self._client.post(url_base + path, cast_to=httpx2.Response, body=body,
                                                           options={"headers": self._auth}))
            except ServerError:
                continue
            n = self._token_count(reply)
            if n is not None:
                self._tokenize_route = route
                return n + extra
        if self._tokenize_route != "estimate":
            log.warning("%s offers no tokenize endpoint; token counts are estimated (3 characters a token); "
                        "pass --tokenizer for exact counts", self.shown_url)
            self._tokenize_route = "estimate"
        return len(text) // 3 + 1 + extra

    @staticmethod
    def _token_count(reply: Any) -> int | None:
        if not isinstance(reply, dict):
            return None
        if isinstance(reply.get("count"), int):
            return int(reply["count"])
        tokens = reply.get("tokens")
        return len(tokens) if isinstance(tokens, list) else None

    # -- generation ------------------------------------------------------------------------------
    def _sampling(self, params: GenerationParams, seed: int | None) -> dict[str, Any]:
        """Arguments for the SDK's ``create``. The SDK merges ``extra_body`` over the named fields, so
        the config's ``extra_body`` can override those too."""
        kwargs: dict[str, Any] = {"model": self.model_id, "max_tokens": params.max_new_tokens,
                                  "temperature": params.temperature, "top_p": params.top_p}
        extra: dict[str, Any] = {"top_k": params.top_k} if params.top_k else {}  # vLLM, SGLang, llama.cpp
        if params.stop:
            kwargs["stop"] = list(params.stop)
        if seed is not None:
            kwargs["seed"] = seed
        return {**kwargs, "extra_body": {**extra, **self.config.extra_body}, "extra_headers": self._auth}

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams,
                 seeds: Sequence[int] | None = None) -> list[Generation]:
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError("generate needs one seed per prompt")
        if not prompts:
            return []
        return self._gather([self._generate_one(p, params, None if seeds is None else int(seeds[i]))
                             for i, p in enumerate(prompts)])

    async def _generate_one(self, prompt: Prompt, params: GenerationParams, seed: int | None) -> Generation:
        kwargs = self._sampling(params, seed)
        text = self._text(prompt)
        if text is None:
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]  # type: ignore[index,union-attr]
            reply = await self._json(self._client.chat.completions.with_raw_response.create(messages=messages,
                                                                                          **kwargs))
        else:
            reply = await self._json(self._client.completions.with_raw_response.create(prompt=text, **kwargs))
        try:
            choice = reply["choices"][0]
            out = choice["text"] if text is not None else (choice["message"].get("content") or "")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ServerError(f"{self.shown_url}: a completion reply without choices[0] text") from None
        out, hit_stop = cut_at_stop(out, params.stop)  # some servers return the stop string too
        finish = "length" if choice.get("finish_reason") == "length" and not hit_stop else "stop"
        usage = reply.get("usage") or {}
        return Generation(text=out, finish_reason=finish, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0))

    # -- scoring ---------------------------------------------------------------------------------
    def score_choices(self, prompts: Sequence[Prompt], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        if len(prompts) != len(choices):
            raise ValueError("score_choices needs one list of choices per prompt")
        texts = [self._text(p) for p in prompts]
        if any(t is None for t in texts):
            raise ScoringUnsupportedError(
                f"model {self.model_id!r}: scoring a chat conversation needs its chat template here, and the "
                "server only applies it for generation; pass the served model's tokenizer with --tokenizer "
                "(or use --chat-format raw for a base model)")
        if self._scoring is None:
            self._scoring = self._probe_scoring(texts[0], choices[0])  # type: ignore[arg-type]
        if self._scoring == "echo":
            flat = [(t, c) for t, cs in zip(texts, choices, strict=True) for c in cs]
            values = iter(self._gather([self._echo_score(t, c) for t, c in flat]))  # type: ignore[arg-type]
            return [[next(values) for _ in cs] for cs in choices]
        return self._gather([self._top_score(t, list(cs)) for t, cs in zip(texts, choices, strict=True)])  # type: ignore[arg-type]

    def _probe_scoring(self, text: str, choices: Sequence[str]) -> Literal["echo", "top_logprobs"]:
        """Find out once which kind of log-probabilities this server returns."""
        probes = {"echo": lambda: self._echo_score(text, choices[0]),
                  "top_logprobs": lambda: self._top_score(text, list(choices))}
        for mode, probe in probes.items():
            try:
                self._run(probe())
                return mode  # type: ignore[return-value]
            except ScoringUnsupportedError:
                continue
            except ServerError as exc:
                log.info("%s scoring not offered: %s", mode, exc)
                continue
        raise ScoringUnsupportedError(
            f"{self.shown_url} returns neither prompt log-probabilities (echo + logprobs on /completions) nor "
            "top_logprobs, so the feedback model cannot score choices there; serve the model with vLLM, SGLang "
            "or llama.cpp, or use --backend transformers")

    async def _echo_score(self, text: str, choice: str) -> float:
        # A local template wrote its own special tokens (vLLM honours add_special_tokens).
        extra = {"add_special_tokens": False} if self._local_template else {}
        reply = await self._json(self._client.completions.with_raw_response.create(
            model=self.model_id, prompt=text + choice, echo=True, logprobs=1, max_tokens=1, temperature=0.0,
            extra_body=extra, extra_headers=self._auth))
        try:
            logprobs = reply["choices"][0]["logprobs"] or {}
            echoed = reply["choices"][0].get("text")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ScoringUnsupportedError("the reply carries no logprobs") from None
        if not isinstance(echoed, str) or not echoed.startswith(text + choice):
            echoed = None  # a server that does not echo the prompt into the text
        usage = reply.get("usage") or {}
        n_generated = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return continuation_logprob(logprobs, len(text), len(text) + len(choice), echoed,
                                    n_generated if isinstance(n_generated, int) else None)

    async def _top_score(self, text: str, choices: list[str]) -> list[float]:
        common = shared_prefix(choices)
        reply = await self._json(self._client.completions.with_raw_response.create(
            model=self.model_id, prompt=text + common, max_tokens=1, logprobs=TOP_LOGPROBS, temperature=0.0,
            extra_headers=self._auth))
        try:
            top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
        except (KeyError, IndexError, TypeError):
            raise ScoringUnsupportedError("the reply carries no top_logprobs") from None
        if isinstance(top, list):  # the chat-style shape: [{token, logprob}]
            top = {t["token"]: t["logprob"] for t in top}
        if not isinstance(top, dict) or not top:
            raise ScoringUnsupportedError("the reply carries no top_logprobs")
        return first_token_scores({str(k): float(v) for k, v in top.items()}, [c[len(common):] for c in choices])

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
