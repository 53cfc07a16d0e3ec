"""Generation backends behind one protocol (:class:`LanguageModel`)."""

from __future__ import annotations

from constitutional_ai.backends.base import Generation, LanguageModel
from constitutional_ai.config import ModelConfig


def load_backend(config: ModelConfig) -> LanguageModel:
    """Instantiate the backend a :class:`ModelConfig` names."""
    if config.backend == "transformers":
        from constitutional_ai.backends.transformers_backend import TransformersBackend

        return TransformersBackend(config)
    if config.backend == "openai":
        from constitutional_ai.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(config)
    if config.backend == "vllm":
        from constitutional_ai.backends.vllm_backend import VLLMBackend

        return VLLMBackend(config)
    raise ValueError(f"unknown backend {config.backend!r}")  # unreachable: the config validates it


__all__ = ["Generation", "LanguageModel", "load_backend"]
