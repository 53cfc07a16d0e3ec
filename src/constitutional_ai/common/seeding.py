"""Seeds derived from what a sample is, not from when it was drawn: the same prompt, round and
sample index give the same seed on every machine, in any batch order and after any resume."""

from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts; the same parts give the same seed on every machine."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
