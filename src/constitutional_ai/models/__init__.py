"""Small local models: the offline demo model and the tiny models tests and benchmarks build."""

from __future__ import annotations


def model_path(name: str) -> str:
    """A loadable path for a model name (the embedded demo model is built on first use)."""
    from constitutional_ai.config import EMBEDDED_MODEL

    if name == EMBEDDED_MODEL:
        from constitutional_ai.models.tiny import ensure_demo_model

        return str(ensure_demo_model())
    return name
