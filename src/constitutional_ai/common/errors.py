"""User-facing errors.

Every error a user can cause (bad file, bad field, unloadable model, changed config on resume)
is a :class:`CAIError` with a one-line message naming the file, the field and the fix. The CLI
prints it without a traceback; library users can catch it as one type.
"""

from __future__ import annotations

from typing import Any


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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name): enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe_loc(raw: Any, loc: tuple[Any, ...]) -> str:
    """``critique_revision[3] (id 'privacy').revision_request`` rather than pydantic's tuple."""
    out, node = "", raw
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and "id" in node:
                out += f" (id {node['id']!r})"
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out


def format_validation_error(source: str, exc: Any, raw: Any = None) -> str:
    """Turn a pydantic ``ValidationError`` into one line: ``source: entry.field: what to do``.

    Pydantic's own message spans many lines and names internal types; users need the file, the
    entry (by its id where it has one) and the field.
    """
    err = exc.errors()[0]
    where = _describe_loc(raw, tuple(err.get("loc", ()))) or "top level"
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if err.get("type") == "missing":
        msg = "field required; add it"
    elif err.get("type") == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{source}: {where}: {msg}{more}"
