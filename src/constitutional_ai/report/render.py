"""The pieces both pages are made of (the run report and the comparison), so the two read alike.

A report gets forwarded, mailed and moved: every plot is inlined as a ``data:`` URI, and there is
no script and no network reference, so the page shows the same wherever it is opened.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

CSS = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;line-height:1.45}"
       "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;"
       "vertical-align:top}img{max-width:100%;border:1px solid #ddd}"
       ".note{background:#fff6d6;border:1px solid #e8c95a;padding:.6em 1em}"
       ".next{background:#eef6ff;border:1px solid #8ab4e8;padding:.6em 1em}"
       "pre{background:#f5f5f5;padding:1em;overflow:auto;font-size:12px}"
       ".sample td{max-width:420px;white-space:pre-wrap}ins{background:#e6ffe6}del{background:#ffe6e6}")


def esc(value: Any) -> str:
    return html.escape(str(value))


def page(title: str, body: list[str]) -> str:
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
                      f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>", *body, "</body></html>"])


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Cells are text, escaped; a column no row has is left out rather than shown empty."""
    columns = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def figure(path: Path, caption: str) -> str:
    """The PNG inlined: a relative link breaks as soon as the page leaves its run directory."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{esc(caption)}'>"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def duration(seconds: float | None) -> str:
    """``3.4 s``, ``1 min 52 s``, ``2 h 5 min``: a reader wants the scale, not milliseconds."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def count(n: int, unit: str) -> str:
    """``3 prompts``, ``1 prompt``: the unit is declared plural (``ReportSpec.unit``)."""
    if n == 1:
        words = unit.split(" ")
        last = words[-1]
        words[-1] = last[:-3] + "y" if last.endswith("ies") else last[:-1] if last.endswith("s") else last
        unit = " ".join(words)
    return f"{n} {unit}"


def plain(value: float, digits: int) -> str:
    """A number without a "-0.0", which reads as a measured negative."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def interval(lower: float, upper: float, digits: int = 2) -> str:
    return f"[{plain(lower, digits)}, {plain(upper, digits)}]"


def signed(value: float, digits: int = 0) -> str:
    """An Elo or a delta with its sign, and a plain ``0`` (never ``+0`` or ``-0``) at zero."""
    text = f"{value:+.{digits}f}"
    return "0" if float(text) == 0 else text


NEXT_STEPS = [
    ("Run a real model on your own red-team prompts",
     "cai run --model Qwen/Qwen2.5-1.5B-Instruct --prompts my_red_team.jsonl --output-dir runs/qwen"),
    ("or the one-GPU recipe as a config", "cai run --config configs/one-gpu-qwen.yaml"),
    ("Start your own constitution from ours", "cai constitution show default > my_constitution.yaml"),
    ("and run with it", "cai run --constitution my_constitution.yaml --output-dir runs/mine"),
    ("Compare two runs (constitution diff, config, metric deltas, answers side by side)",
     "cai report runs/default runs/qwen"),
]


def next_steps_html() -> str:
    items = "".join(f"<li>{esc(what)}: <code>{esc(command)}</code></li>" for what, command in NEXT_STEPS)
    return f"<div class='next'><h2>What to do next</h2><ul>{items}</ul></div>"


def next_steps_markdown() -> list[str]:
    return ["## What to do next", "", *(f"- {what}: `{command}`" for what, command in NEXT_STEPS)]
