"""SL-CAI: critique-revision engine and the stage that runs it over a prompt set."""

from constitutional_ai.critique.engine import CritiqueRevisionEngine, clean_completion

__all__ = ["CritiqueRevisionEngine", "clean_completion"]
