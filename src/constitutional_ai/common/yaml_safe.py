"""Reading YAML that a user hands us (configs, constitutions) without letting the file decide how
much time or memory it costs: a size cap, and a cap on aliases (an alias "bomb" of nested
references expands exponentially when the data is walked, though the file is a few lines)."""

from __future__ import annotations

from typing import Any

import yaml

from constitutional_ai.common.errors import CAIError

#: Real configs and constitutions are a few kilobytes; the paper's whole constitution is 60 KB.
MAX_YAML_BYTES = 4 * 1024 * 1024
MAX_ALIASES = 100


class _CountingLoader(yaml.SafeLoader):
    """A safe loader that stops at the ``MAX_ALIASES``-th alias."""

    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name references); write the values out")
        return super().compose_node(parent, index)


def load_yaml(text: str | bytes, source: str, error: type[CAIError], max_bytes: int = MAX_YAML_BYTES) -> Any:
    """``yaml.safe_load`` with the limits above; a breach or a syntax error is ``error`` in one line."""
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > max_bytes:
        raise error(f"{source}: {size} bytes is over the {max_bytes}-byte limit for a YAML file")
    loader = _CountingLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{source}{at}: not valid YAML: {problem}") from None
    finally:
        loader.dispose()
