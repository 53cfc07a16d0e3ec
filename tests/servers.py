"""Real servers for backend tests: llama.cpp's OpenAI-compatible server on a GGUF export of a tiny
model, and a fault-injecting HTTP proxy to put in front of it."""

from __future__ import annotations

import http.client
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_available() -> str | None:
    """Why the llama.cpp server cannot run here, or None when it can."""
    try:
        import gguf  # noqa: F401
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        return f"llama-cpp-python[server] and gguf are needed ({exc}); pip install -e '.[dev]'"
    return None


@contextmanager
def llama_server(gguf_path: Path, n_ctx: int = 2048, log_path: Path | None = None, threads: int = 1) -> Iterator[str]:
    """Serve ``gguf_path`` with ``python -m llama_cpp.server`` on loopback; yields its /v1 base URL."""
    port = free_port()
    log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_batch", "512",
           "--logits_all", "true", "--verbose", "false", "--model_alias", "tiny"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}; see {log_path}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("llama_cpp.server did not come up in 120 s")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


#: What the proxy can do to a request instead of (or on top of) forwarding it.
FAULTS = ("ok", "drop", "500", "429", "truncated", "slow", "cut", "delay")


class FaultProxy:
    """Forwards to ``upstream`` and, by a fixed rotation over requests, injects one fault each:

    drop (close without a reply), 500, 429 with ``Retry-After``, truncated JSON (a short body with
    a matching length), slow (longer than the client's timeout), cut (the connection closes
    mid-body), delay (slow but in time). Every fault is counted in ``injected``.
    """

    def __init__(self, upstream: str, pattern: Sequence[str] = FAULTS, slow_seconds: float = 3.0,
                 retry_after: str = "1"):
        self.upstream = urlsplit(upstream)
        self.pattern = list(pattern)
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.injected: Counter[str] = Counter()
        self._counter = itertools.count()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self, body: bytes | None) -> tuple[int, bytes, str]:
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                kind = reply.getheader("Content-Type", "application/json")
                conn.close()
                return reply.status, data, kind

            def _send(self, status: int, data: bytes, kind: str = "application/json",
                      extra: dict[str, str] | None = None, length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            def _handle(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else None
                fault = proxy.next_fault()
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "500":
                    self._send(500, b'{"error": {"message": "injected"}}')
                    return
                if fault == "429":
                    self._send(429, b'{"error": {"message": "slow down"}}', extra={"Retry-After": proxy.retry_after})
                    return
                if fault in ("slow", "delay"):
                    time.sleep(proxy.slow_seconds if fault == "slow" else proxy.slow_seconds / 10)
                status, data, kind = self._forward(body)
                if fault == "truncated":
                    data = data[: max(1, len(data) // 2)]
                    self._send(status, data, kind)
                elif fault == "cut":
                    self.close_connection = True
                    self._send(status, data[: max(1, len(data) // 2)], kind, length=len(data))
                    self.connection.shutdown(socket.SHUT_RDWR)
                else:
                    self._send(status, data, kind)

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{self.upstream.path}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def next_fault(self) -> str:
        with self._lock:
            fault = self.pattern[next(self._counter) % len(self.pattern)]
            self.injected[fault] += 1
        return fault

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
