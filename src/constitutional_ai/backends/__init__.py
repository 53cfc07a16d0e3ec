"""Generation backends behind one protocol (:class:`LanguageModel`)."""

from __future__ import annotations

import importlib

from constitutional_ai.backends.base import Generation, LanguageModel
from constitutional_ai.config import BACKENDS, ModelConfig


def load_backend(config: ModelConfig) -> LanguageModel:
    """Instantiate the backend a :class:`ModelConfig` names (``config.BACKENDS``), importing only it."""
    module, _, name = BACKENDS[config.backend].partition(":")
    return getattr(importlib.import_module(module), name)(config)


__all__ = ["Generation", "LanguageModel", "load_backend"]
