"""An HTTP scoring endpoint for a trained PM, compatible with OpenRLHF's ``--remote_rm_url``.

OpenRLHF posts ``{"query": [text, ...], "prompts": [...], "labels": [...]}`` (each query is the
prompt plus the response, as the policy's chat template rendered it) and reads ``"rewards"`` from
the JSON reply. We answer ``{"rewards": [...], "scores": [...], "extra_logs": {}}``, so teams who
run PPO at cluster scale in OpenRLHF can point it at ``cai serve-pm`` as is.

Served by FastAPI on uvicorn (the stack OpenRLHF's own reward server uses), because a reward
server is judged under load: requests are validated by pydantic (every malformed body gets a 4xx
JSON error saying what was wrong, and body size, queries per request and query length are
capped), and concurrent requests are gathered into one forward pass (:class:`DynamicBatcher`) so
many small clients cost what one big batch costs, while a long request is served in slices,
round-robin with the others, so it cannot starve them.

Each query is split back into a conversation and its final response: at the end of the given
prompt when the query starts with it (a prompt ending in a generation header such as
``<|im_start|>assistant\\n`` opens the turn being scored, it is not an empty turn of its own), else
at the last assistant turn of a ChatML, Llama-3 or ``Human:/Assistant:`` transcript; text in no
known layout is scored as a response to an empty conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import itertools
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the handler's annotations here

from constitutional_ai.common.chat_format import parse_raw
from constitutional_ai.common.errors import ConfigError
from constitutional_ai.common.types import Conversation
from constitutional_ai.config import ServePMConfig

log = logging.getLogger(__name__)

_CHATML = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)(?:<\|im_end\|>|$)", re.S)
_LLAMA3 = re.compile(r"<\|start_header_id\|>(system|user|assistant)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)",
                     re.S)
_TRAILING = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<eos>", "<pad>", "[PAD]")
_LEADING = ("<|begin_of_text|>", "<s>", "<bos>")


def _strip_trailing(text: str, extra: tuple[str, ...] = ()) -> str:
    text = text.rstrip()
    changed = True
    while changed:
        changed = False
        for token in (*_TRAILING, *extra):
            if token and text.endswith(token):
                text, changed = text[:-len(token)].rstrip(), True
    return text


def parse_conversation(text: str) -> Conversation:
    """Messages of a rendered transcript (ChatML, Llama 3, or the paper's raw format). A final
    assistant turn with nothing in it is the generation header, not a turn: it is left out."""
    for token in _LEADING:
        text = text.removeprefix(token)
    messages: Conversation = []
    for pattern in (_CHATML, _LLAMA3):
        messages = [{"role": r, "content": c.strip()} for r, c in pattern.findall(text)]
        if messages:
            break
    else:
        if "Human:" in text or "Assistant:" in text:
            messages = parse_raw(text if text.startswith("\n\n") else "\n\n" + text)
        elif text.strip():
            messages = [{"role": "user", "content": text.strip()}]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages = messages[:-1]
    return messages


def split_query(query: str, prompt: str | None = None, extra_tokens: tuple[str, ...] = ()) -> tuple[Conversation, str]:
    """``(conversation, response)`` of one OpenRLHF query."""
    query = _strip_trailing(query, extra_tokens)
    if prompt and query.startswith(prompt):
        return parse_conversation(prompt), _strip_trailing(query[len(prompt):], extra_tokens).strip()
    messages = parse_conversation(query)
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return [], query.strip()


# -- dynamic batching ------------------------------------------------------------------------------
@dataclass
class _Request:
    pairs: list[tuple[Conversation, str]]
    future: asyncio.Future[list[float]]
    rewards: list[float] = field(default_factory=list)
    next: int = 0  # first pair not yet handed to a batch


class DynamicBatcher:
    """Gathers the pairs of concurrent requests into batches of up to ``max_batch_size``, waiting at
    most ``max_wait_ms`` for a batch to fill, and scores each batch in one call on one worker thread
    (the model is not shared between threads). Slices of the waiting requests are taken round-robin,
    so a request of 25,000 queries is interleaved with the small ones instead of holding the model."""

    def __init__(self, score: Callable[[list[Conversation], list[str]], list[float]], max_batch_size: int = 64,
                 max_wait_ms: float = 5.0):
        self.score = score
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self._waiting: OrderedDict[int, _Request] = OrderedDict()
        self._ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, pairs: list[tuple[Conversation, str]]) -> list[float]:
        if not pairs:
            return []
        assert self._wake is not None, "DynamicBatcher.start() was not called"
        request = _Request(pairs, asyncio.get_running_loop().create_future())
        self._waiting[next(self._ids)] = request
        self._wake.set()
        return await request.future

    def _take(self) -> list[tuple[_Request, int, int]]:
        """Up to ``max_batch_size`` pairs, an equal share from each waiting request in turn."""
        taken: list[tuple[_Request, int, int]] = []
        room = self.max_batch_size
        while room and self._waiting:
            share = max(1, room // len(self._waiting))
            for key in list(self._waiting):
                if not room:
                    break
                request = self._waiting[key]
                n = min(share, room, len(request.pairs) - request.next)
                taken.append((request, request.next, request.next + n))
                request.next += n
                room -= n
                if request.next == len(request.pairs):
                    del self._waiting[key]
        return taken

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            deadline = loop.time() + self.max_wait
            while sum(len(r.pairs) - r.next for r in self._waiting.values()) < self.max_batch_size \
                    and loop.time() < deadline:
                await asyncio.sleep(min(0.001, max(0.0, deadline - loop.time())))
            taken = self._take()
            if not self._waiting:
                self._wake.clear()
            if not taken:
                continue
            pairs = [p for request, a, b in taken for p in request.pairs[a:b]]
            try:
                rewards = await asyncio.to_thread(self.score, [c for c, _ in pairs], [r for _, r in pairs])
            except Exception as exc:  # one failed batch fails its requests, not the server
                log.exception("scoring failed")
                for request, _, _ in taken:
                    if not request.future.done():
                        request.future.set_exception(exc)
                    self._drop(request)
                continue
            self.batches += 1
            start = 0
            for request, a, b in taken:
                request.rewards.extend(rewards[start:start + (b - a)])
                start += b - a
                if len(request.rewards) == len(request.pairs) and not request.future.done():
                    request.future.set_result(request.rewards)

    def _drop(self, request: _Request) -> None:
        for key, waiting in list(self._waiting.items()):
            if waiting is request:
                del self._waiting[key]


# -- the app ---------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def bearer_token(config: ServePMConfig) -> str | None:
    """The token clients must send (from ``config.token_env``), or None; refuses, before anything is
    loaded, to listen beyond loopback without one unless ``config.insecure``."""
    token = os.environ.get(config.token_env) or None
    if not is_loopback(config.host) and token is None and not config.insecure:
        raise ConfigError(f"serve_pm.host={config.host} listens beyond this machine with no token; set the "
                          f"environment variable {config.token_env} (clients send Authorization: Bearer <token>) "
                          "or pass --serve_pm.insecure")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(score: Callable[[list[Conversation], list[str]], list[float]], name: str,
              specials: Sequence[str] = (), limits: ServePMConfig | None = None, token: str | None = None) -> Any:
    """The FastAPI app: ``POST /get_reward`` (and ``/``), ``GET /health``; ``limits`` caps what one
    request may ask for (past a limit the reply is 413, never a server out of memory)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

    class RewardRequest(BaseModel):
        """OpenRLHF's body; other fields it sends (``labels``...) are accepted and ignored."""

        model_config = ConfigDict(extra="allow")
        query: list[StrictStr]
        prompts: list[StrictStr] | None = None

    limits = limits or ServePMConfig()
    batcher = DynamicBatcher(score, limits.max_batch_size, limits.max_wait_ms)
    extra_tokens = tuple(t for t in specials if t)

    @asynccontextmanager
    async def lifespan(_: Any) -> Any:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="constitutional-ai reward model", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "batches": batcher.batches}

    async def read_body(request: Request) -> bytes | JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return error(400, "Content-Length is not a number")
            if int(declared) > limits.max_body_bytes:
                return error(413, f"body of {declared} bytes is over the {limits.max_body_bytes}-byte limit "
                                  "(serve_pm.max_body_bytes)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                return error(413, f"body is over the {limits.max_body_bytes}-byte limit (serve_pm.max_body_bytes)")
        return bytes(body)

    async def get_reward(request: Request) -> JSONResponse:
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        raw = await read_body(request)
        if isinstance(raw, JSONResponse):
            return raw
        try:
            data = json.loads(raw or b"null", parse_constant=_reject_constant)
        except RecursionError:
            return error(400, "JSON nested too deeply")
        except (ValueError, UnicodeDecodeError) as exc:
            return error(400, f"body is not valid JSON: {str(exc).splitlines()[0]}")
        if not isinstance(data, dict):
            return error(422, f'expected a JSON object {{"query": [text, ...]}}, got {type(data).__name__}')
        try:
            body = RewardRequest.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return error(422, f"{where}: {first['msg']} "
                              '(expected {"query": [text, ...], "prompts": [text, ...]})')
        if len(body.query) > limits.max_queries:
            return error(413, f"{len(body.query)} queries is over the {limits.max_queries} per request limit "
                              "(serve_pm.max_queries); split the request")
        if body.prompts is not None and len(body.prompts) != len(body.query):
            return error(422, f"prompts has {len(body.prompts)} entries and query {len(body.query)}; they must match")
        longest = max((len(q) for q in body.query), default=0)
        if longest > limits.max_query_chars:
            return error(413, f"a query of {longest} characters is over the {limits.max_query_chars} limit "
                              "(serve_pm.max_query_chars)")
        prompts = body.prompts or [None] * len(body.query)
        pairs = [split_query(q, p, extra_tokens) for q, p in zip(body.query, prompts, strict=True)]
        try:
            rewards = await batcher.submit(pairs)
        except Exception as exc:
            return error(500, f"scoring failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return JSONResponse({"rewards": rewards, "scores": rewards, "extra_logs": {}})

    app.post("/get_reward")(get_reward)
    app.post("/")(get_reward)
    return app


class RewardServer:
    """A PM served on uvicorn as ``config`` (the ``serve_pm`` section) says: :meth:`serve_forever` for
    the CLI, :meth:`start`/:meth:`shutdown` for tests and notebooks."""

    def __init__(self, scorer: Any, config: ServePMConfig | None = None):
        import uvicorn

        config = config or ServePMConfig()
        token = bearer_token(config)
        self.scorer = scorer
        specials = tuple(t for t in (scorer.tokenizer.pad_token, scorer.tokenizer.eos_token) if t)
        self.app = build_app(scorer.score_responses, scorer.name, specials, config, token)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=config.host, port=config.port, log_level="warning",
                                                    backlog=2048, timeout_graceful_shutdown=30, access_log=False,
                                                    lifespan="on"))
        self._thread: threading.Thread | None = None
        self.host, self.port = config.host, config.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/get_reward"

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM; requests in flight finish first (graceful shutdown)."""
        self.server.run()

    def start(self) -> threading.Thread:
        """Serve on a background thread; returns once the server accepts connections."""
        import socket

        if self.port == 0:  # bind here so the URL is known before the server starts
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
            self.port = sock.getsockname()[1]
            sock.close()
            self.server.config.port = self.port
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the reward server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self._thread

    def shutdown(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
