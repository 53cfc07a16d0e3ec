"""The layering of docs/architecture.md, checked from the source: no import cycles, the ground floor
imports nothing above it, and no algorithm package reaches up into a stage module or the CLI.

Every import counts, including the ones inside functions: a lazy import is still a dependency,
and a lazy cycle is still a design that cannot be read bottom-up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "constitutional_ai"
#: The ground floor: shared vocabulary, importing nothing else from the package.
GROUND = ("common",)
#: Algorithm packages: they may use the floor, data, constitution, backends, models and each other,
#: never the stages that run them, the report or the command line.
ALGORITHMS = ("critique", "feedback", "preference_model", "rl", "evaluation", "training")
UPSTAIRS = ("stages", "cli", "report", "__main__")
#: The report is built from what stages declare (``report.spec``), so it never imports them.
ABOVE_REPORT = ("stages", "cli", "__main__")
#: Entrypoint-level adapters for RL engines (verl, OpenRLHF load them in their own workers): they use
#: the layers below (preference_model, data, config, common), never stages, the report or the CLI, and
#: nothing below imports them.
ADAPTERS = ("integrations",)
#: Engines & data packages held to the rule by name: they use config, layout, data, constitution and
#: common, never an algorithm, a stage, the report, the CLI or an adapter (stages call them).
DATA_LAYER = ("artifacts",)


def _modules() -> dict[str, Path]:
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = file
    return out


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (top-level and function-level imports)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, deps in graph.items():
        layer = _layer(module)
        for dep in sorted(deps):
            if layer in GROUND and _layer(dep) not in GROUND:
                found.append(f"{module} (ground floor) imports {dep}")
            if layer in ALGORITHMS and _layer(dep) in (*UPSTAIRS, *ADAPTERS):
                found.append(f"{module} (algorithm) imports {dep}")
            if layer in DATA_LAYER and _layer(dep) in (*UPSTAIRS, *ADAPTERS, *ALGORITHMS):
                found.append(f"{module} (engines & data) imports {dep}")
            if layer in ADAPTERS and _layer(dep) in UPSTAIRS:
                found.append(f"{module} (adapter) imports {dep}")
            if layer == "report" and _layer(dep) in ABOVE_REPORT:
                found.append(f"{module} (report) imports {dep}")
    return found


def test_the_package_has_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_layers_only_import_downwards():
    assert layering_violations(import_graph()) == []


def test_the_checks_catch_what_they_should():
    """The checker itself: a planted cycle and a planted upward import are reported."""
    graph = {"constitutional_ai.a": {"constitutional_ai.b"}, "constitutional_ai.b": {"constitutional_ai.a"},
             "constitutional_ai.critique.engine": {"constitutional_ai.stages.critique"},
             "constitutional_ai.common.types": {"constitutional_ai.config"},
             "constitutional_ai.stages.critique": {"constitutional_ai.critique.engine"},
             "constitutional_ai.report.build": {"constitutional_ai.stages.registry"},
             "constitutional_ai.integrations.verl": {"constitutional_ai.stages.registry",
                                                     "constitutional_ai.preference_model.reward_model"},
             "constitutional_ai.rl.ppo": {"constitutional_ai.integrations.verl"}}
    assert find_cycles(graph) == [["constitutional_ai.a", "constitutional_ai.b"],
                                  ["constitutional_ai.critique.engine", "constitutional_ai.stages.critique"]]
    assert sorted(layering_violations(graph)) == [
        "constitutional_ai.common.types (ground floor) imports constitutional_ai.config",
        "constitutional_ai.critique.engine (algorithm) imports constitutional_ai.stages.critique",
        "constitutional_ai.integrations.verl (adapter) imports constitutional_ai.stages.registry",
        "constitutional_ai.report.build (report) imports constitutional_ai.stages.registry",
        "constitutional_ai.rl.ppo (algorithm) imports constitutional_ai.integrations.verl",
    ]


@pytest.mark.parametrize("package", ALGORITHMS + GROUND + ADAPTERS + DATA_LAYER)
def test_each_layer_exists(package):
    """A renamed package must not silently drop out of the checks above."""
    assert (PACKAGE / package / "__init__.py").is_file()
