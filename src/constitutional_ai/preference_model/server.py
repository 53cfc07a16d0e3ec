"""An HTTP scoring endpoint for a trained PM, compatible with OpenRLHF's ``--remote_rm_url``.

OpenRLHF posts ``{"query": [text, ...], "prompts": [...], "labels": [...]}`` (each query is the
prompt plus the response, as the policy's chat template rendered it) and reads ``"rewards"`` from
the JSON reply. We answer ``{"rewards": [...], "scores": [...], "extra_logs": {}}``, so teams who
run PPO at cluster scale in OpenRLHF can point it at ``cai serve-pm`` as is.

Each query is split back into a conversation and its final response: at the end of the given
prompt when the query starts with it, else at the last assistant turn of a ChatML, Llama-3 or
``Human:/Assistant:`` transcript; text in no known layout is scored as a response to an empty
conversation. Only the standard library serves (threads, no extra dependency).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from constitutional_ai.common.chat_format import parse_raw
from constitutional_ai.common.types import Conversation
from constitutional_ai.preference_model.reward_model import RewardModel

log = logging.getLogger(__name__)

_CHATML = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)(?:<\|im_end\|>|$)", re.S)
_LLAMA3 = re.compile(r"<\|start_header_id\|>(system|user|assistant)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)",
                     re.S)
_TRAILING = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<eos>", "<pad>", "[PAD]")


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
    """Messages of a rendered transcript (ChatML, Llama 3, or the paper's raw format)."""
    for pattern in (_CHATML, _LLAMA3):
        found = [{"role": r, "content": c.strip()} for r, c in pattern.findall(text)]
        if found:
            return found
    if "Human:" in text or "Assistant:" in text:
        return parse_raw(text if text.startswith("\n\n") else "\n\n" + text)
    return [{"role": "user", "content": text.strip()}] if text.strip() else []


def split_query(query: str, prompt: str | None = None, extra_tokens: tuple[str, ...] = ()) -> tuple[Conversation, str]:
    """``(conversation, response)`` of one OpenRLHF query."""
    query = _strip_trailing(query, extra_tokens)
    if prompt and query.startswith(prompt):
        return parse_conversation(prompt), _strip_trailing(query[len(prompt):], extra_tokens).strip()
    messages = parse_conversation(query)
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return [], query.strip()


class RewardServer:
    """``POST /get_reward`` (and ``POST /``) on a thread per request; one model call at a time."""

    def __init__(self, scorer: RewardModel, host: str = "127.0.0.1", port: int = 5000):
        self.scorer = scorer
        self._lock = threading.Lock()
        specials = tuple(t for t in (scorer.tokenizer.pad_token, scorer.tokenizer.eos_token) if t)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._reply(200, {"status": "ok", "model": scorer.name}) if self.path in ("/", "/health") \
                    else self._reply(404, {"error": "POST /get_reward"})

            def do_POST(self) -> None:
                if self.path not in ("/", "/get_reward"):
                    self._reply(404, {"error": f"unknown path {self.path}; POST /get_reward"})
                    return
                try:
                    length = int(self.headers.get("Content-Length", 0))
                    body = json.loads(self.rfile.read(length) or b"{}")
                    queries = body.get("query")
                    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
                        raise ValueError('expected {"query": [text, ...]}')
                    prompts = body.get("prompts") or [None] * len(queries)
                    if len(prompts) != len(queries):
                        raise ValueError("prompts and query differ in length")
                except (ValueError, json.JSONDecodeError) as exc:
                    self._reply(400, {"error": str(exc)})
                    return
                pairs = [split_query(q, p, specials) for q, p in zip(queries, prompts, strict=True)]
                with server._lock:
                    rewards = scorer.score_responses([c for c, _ in pairs], [r for _, r in pairs])
                self._reply(200, {"rewards": rewards, "scores": rewards, "extra_logs": {}})

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/get_reward"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> threading.Thread:
        """Serve on a background thread (tests, notebooks); :meth:`shutdown` stops it."""
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
