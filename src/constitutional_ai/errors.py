"""User-facing errors.

Every error a user can cause (bad file, bad field, unloadable model, changed config on resume)
is a :class:`CAIError` with a one-line message naming the file, the field and the fix. The CLI
prints it without a traceback; library users can catch it as one type.
"""

from __future__ import annotations


class CAIError(Exception):
    """An error caused by input the user controls; the message says how to fix it."""


class ConfigError(CAIError):
    """A config file or flag is invalid."""


class ConstitutionError(CAIError):
    """A constitution file is invalid."""


class DataError(CAIError):
    """A data file or dataset cannot be read as asked."""


class ModelLoadError(CAIError):
    """A model or tokenizer cannot be loaded."""


class ResumeError(CAIError):
    """An output directory holds a run made with a different config or constitution."""


def format_validation_error(source: str, exc: Exception) -> str:
    """Turn a pydantic ``ValidationError`` into one line: ``source: loc: message``.

    Pydantic's own message spans many lines and names internal types; users need the file, the
    entry and the field.
    """
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return f"{source}: {exc}"
    parts = []
    for err in errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid value")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(errors()) - 3
    tail = f" (and {more} more)" if more > 0 else ""
    return f"{source}: " + "; ".join(parts) + tail
