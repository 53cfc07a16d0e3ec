"""The constitution as data: principles and few-shot examples, validated and content-hashed."""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import constitutional_ai.constitution.loaders as loaders
from constitutional_ai.common.errors import ConstitutionError, format_validation_error

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    """One turn of a conversation, in the `datasets`/chat-template shape ``{role, content}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Role
    content: str


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class CritiqueRevisionPrinciple(BaseModel):
    """A critique request and the revision request that fixes what the critique looks for."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1)
    critique_request: str
    revision_request: str

    _check = field_validator("critique_request", "revision_request")(_non_blank)


class ComparisonPrinciple(BaseModel):
    """A question the feedback model answers by choosing between two responses."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1)
    text: str

    _check = field_validator("text")(_non_blank)


class CritiqueExample(BaseModel):
    """A worked critique and revision, shown before the real request (few-shot prompting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    messages: list[Message] = Field(min_length=2)
    critique_request: str
    critique: str
    revision_request: str
    revision: str

    @field_validator("messages")
    @classmethod
    def _ends_with_response(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "assistant":
            raise ValueError("the last message must be the assistant response being critiqued")
        return messages


class FeedbackExample(BaseModel):
    """A worked comparison for the feedback model: a conversation and its better/worse replies."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    messages: list[Message] = Field(min_length=1)
    chosen: str
    rejected: str
    principle: str | None = None


class Constitution(BaseModel):
    """A written constitution, the one input that defines what the model is aligned to.

    Everything a stage produces records :attr:`hash`, so any dataset or checkpoint can be traced
    back to the exact principles that shaped it; two constitutions with the same content have the
    same hash whatever file format or key order they came from.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "unnamed"
    version: str = "0"
    description: str = ""
    critique_revision: list[CritiqueRevisionPrinciple] = Field(default_factory=list)
    comparison: list[ComparisonPrinciple] = Field(default_factory=list)
    critique_examples: list[CritiqueExample] = Field(default_factory=list)
    feedback_examples: list[FeedbackExample] = Field(default_factory=list)
    chain_of_thought_examples: list[str] = Field(
        default_factory=list,
        description="Raw chain-of-thought feedback examples with a '{}' slot for the principle.",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Constitution:
        if not self.critique_revision and not self.comparison:
            raise ValueError("needs at least one critique_revision or comparison principle")
        for field in ("critique_revision", "comparison"):
            seen: set[str] = set()
            for i, principle in enumerate(getattr(self, field)):
                if principle.id in seen:
                    raise ValueError(f"{field}.{i}.id: duplicate id {principle.id!r}; ids must be unique")
                seen.add(principle.id)
        return self

    # -- identity -------------------------------------------------------------------------------
    def canonical_json(self) -> str:
        """The canonical form the hash is taken over: sorted keys, no whitespace, UTF-8."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)

    @property
    def hash(self) -> str:
        """``sha256:<hex>`` of :meth:`canonical_json`; stable across formats and key order."""
        digest = hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()
        return f"sha256:{digest}"

    # -- lookups --------------------------------------------------------------------------------
    def critique_principle(self, principle_id: str) -> CritiqueRevisionPrinciple:
        for principle in self.critique_revision:
            if principle.id == principle_id:
                return principle
        raise KeyError(principle_id)

    def comparison_principle(self, principle_id: str) -> ComparisonPrinciple:
        for principle in self.comparison:
            if principle.id == principle_id:
                return principle
        raise KeyError(principle_id)

    # -- loading and saving (file formats are read by constitution.loaders) -------------------
    @classmethod
    def from_dict(cls, raw: Any, source: str) -> Constitution:
        """Validate raw data, turning pydantic's report into one line that names file, entry, field."""
        if not isinstance(raw, dict):
            raise ConstitutionError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConstitutionError(format_validation_error(source, exc, raw)) from None

    @classmethod
    def from_file(cls, path: str) -> Constitution:
        """Load our YAML or JSON format."""
        return cls.from_dict(*loaders.read_constitution_file(path))

    @classmethod
    def from_anthropic_paper(cls, directory: str) -> Constitution:
        """Load the JSON files published with the paper (anthropics/ConstitutionalHarmlessnessPaper)."""
        return cls.from_dict(*loaders.read_anthropic_paper(directory))

    @classmethod
    def default(cls) -> Constitution:
        """The constitution that ships with the package, written in our own words (parsed once)."""
        return _default()

    @classmethod
    def load(cls, spec: str | None) -> Constitution:
        """Resolve a config value: ``None``/``"default"``, ``"anthropic-paper:DIR"``, a directory
        holding the paper's files, or a YAML/JSON file."""
        if spec is None or str(spec) in ("", "default"):
            return _default()
        return cls.from_dict(*loaders.read_spec(spec))

    def save(self, path: str) -> None:
        loaders.write_constitution(self.model_dump(mode="json"), path)


@functools.cache
def _default() -> Constitution:
    return Constitution.from_dict(*loaders.read_default())
