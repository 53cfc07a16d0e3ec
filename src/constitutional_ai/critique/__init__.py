"""SL-CAI: the critique-revision engine (the stage that runs it is ``stages/critique.py``)."""

from constitutional_ai.common.text import clean_completion
from constitutional_ai.critique.engine import CritiqueRevisionEngine

__all__ = ["CritiqueRevisionEngine", "clean_completion"]
