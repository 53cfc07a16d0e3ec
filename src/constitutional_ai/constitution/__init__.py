"""Constitution: principles as data, loaders, and the prompts they render to."""

from constitutional_ai.constitution.model import (
    ComparisonPrinciple,
    Constitution,
    CritiqueExample,
    CritiqueRevisionPrinciple,
    FeedbackExample,
    Message,
)

__all__ = [
    "ComparisonPrinciple",
    "Constitution",
    "CritiqueExample",
    "CritiqueRevisionPrinciple",
    "FeedbackExample",
    "Message",
]
