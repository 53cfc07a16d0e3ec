"""Reaching the Hugging Face Hub without hanging: a fast check before any download is tried.

huggingface_hub retries a dead network with back-off for the better part of a minute and logs
every attempt; a user on an offline machine should get one clear line at once instead.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import urlparse


def looks_like_path(name: str, suffixes: Iterable[str] = ()) -> bool:
    """A filesystem path rather than a hub id (``name`` or ``org/name``): it starts like a path,
    has more than one slash, or ends with one of ``suffixes`` (``.jsonl``...)."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or any(name.lower().endswith(s) for s in suffixes))


def hub_offline_reason(timeout: float = 3.0, offline_vars: tuple[str, ...] = ("HF_HUB_OFFLINE",)) -> str | None:
    """Why the Hub cannot be reached right now, or None when it can (or when a proxy decides)."""
    for var in offline_vars:
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows; let the download try
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:
        endpoint = "https://huggingface.co"
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host} is unreachable ({exc.strerror or exc})"


@contextmanager
def quiet_model_loading() -> Iterator[None]:
    """Loading a model for a backend: no hub retry warnings, transformers' messages and progress
    bars off, all restored after. A failure is reported by our own one-line error instead."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with quiet_hub_logs():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def quiet_hub_logs() -> Iterator[None]:
    """Silence huggingface_hub's per-retry warnings; our own error says what went wrong."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
