"""The stage registry: each runnable stage declared once, and everything that runs stages reads it.

A :class:`Stage` says what a stage is called (``name`` in ``pipeline.json`` and the report,
``command`` on the command line), which config sections change what it writes (its identity
hash, and its CLI flags), which run-layout entries it consumes and produces (the pipeline's order
follows from them), the function that runs it, and what the report shows for it. ``cai <command>``,
``cai run`` and ``cai report`` all iterate :func:`stages`; nothing else keeps a list of stages.

Built-in stages declare themselves in their own module under ``constitutional_ai.stages``, found
by :func:`load_builtin_stages`; a plug-in (or a test) calls :func:`register` with its own.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from constitutional_ai.layout import RunLayout
from constitutional_ai.report.spec import ReportSpec

if TYPE_CHECKING:
    from constitutional_ai.config import RunConfig

#: The fields every command takes, whatever its sections.
COMMON_FIELDS = ("output_dir", "seed", "constitution", "resume", "overwrite", "progress", "verbose")


@dataclass(frozen=True)
class Stage:
    """One runnable stage (see the module docstring)."""

    name: str
    command: str
    run: Callable[[RunConfig], Any]
    help: str
    sections: tuple[str, ...]  # RunConfig sections that change what it writes (its identity)
    options: tuple[str, ...] = ()  # sections it also reads that change speed or location only (flags, no identity)
    #: Fields `cai run` sets for this stage (its ``wire``): in the identity, but not flags of `cai run`.
    wired: tuple[str, ...] = ()
    #: Identity sections the stage itself does not read (the pipeline wires them in): not its flags.
    unread: tuple[str, ...] = ()
    #: Dotted config fields naming input files: their content is part of the identity.
    inputs: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()  # RunLayout entries it reads
    produces: tuple[str, ...] = ()  # RunLayout entries it writes
    pipeline: bool = True  # part of `cai run`
    #: `cai run`'s wiring: the config this stage runs with inside the pipeline (e.g. pairs come from
    #: the SL-CAI model), from the run's config and layout.
    wire: Callable[[RunConfig, RunLayout], RunConfig] | None = None
    report: ReportSpec | None = None
    #: The CLI's summary table from the run function's result; unset: ``result.as_dict()``.
    summary: Callable[[Any], dict[str, Any]] | None = None
    #: What the run function's result says the stage made, in named units (``"52 prompts"``,
    #: ``"26 steps on 208 conversations"``): the line `cai run` prints and keeps in summary.json.
    produced: Callable[[Any], str] | None = None

    @property
    def flag_sections(self) -> tuple[str, ...]:
        """The config sections its command offers as flags: what it reads."""
        read = (s for s in (*self.sections, *self.options) if s not in self.unread)
        return tuple(dict.fromkeys((*COMMON_FIELDS, *read)))

    def __post_init__(self) -> None:
        for entry in (*self.consumes, *self.produces):
            if entry not in RunLayout.ENTRIES:
                raise ValueError(f"stage {self.name!r}: {entry!r} is not a RunLayout entry")


_REGISTRY: dict[str, Stage] = {}
_BUILTIN_LOADED = False
#: Modules of this package that hold machinery, not stages.
_NOT_STAGES = {"registry", "runner", "streaming", "ray_runner", "pipeline", "training"}


def register(stage: Stage, *, replace: bool = False) -> Stage:
    """Add a stage; its name and command must be new unless ``replace``."""
    clash = next((s for s in _REGISTRY.values() if s.command == stage.command and s.name != stage.name), None)
    if not replace and (stage.name in _REGISTRY or clash):
        raise ValueError(f"a stage named {stage.name!r} (command {stage.command!r}) is already registered")
    _REGISTRY[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def load_builtin_stages() -> None:
    """Import every stage module of this package once; each registers its own stages."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    import constitutional_ai.stages as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_STAGES:
            importlib.import_module(f"{package.__name__}.{info.name}")


def stages() -> list[Stage]:
    """Every registered stage, built-in ones first, in registration order."""
    load_builtin_stages()
    return list(_REGISTRY.values())


def get(name_or_command: str) -> Stage:
    for stage in stages():
        if name_or_command in (stage.name, stage.command):
            return stage
    raise KeyError(name_or_command)


def pipeline_order(candidates: list[Stage] | None = None) -> list[Stage]:
    """The pipeline's stages, each after every stage producing what it consumes (Kahn's algorithm,
    ties kept in registration order). A consumed entry nobody in the pipeline produces is an input
    from outside (or optional); a cycle is a declaration error."""
    todo = [s for s in (candidates if candidates is not None else stages()) if s.pipeline]
    needs = {s.name: set(upstream(s, todo)) for s in todo}
    order: list[Stage] = []
    while todo:
        ready = next((s for s in todo if not needs[s.name] - {o.name for o in order}), None)
        if ready is None:
            raise ValueError("the stages' consumes/produces form a cycle: " + ", ".join(s.name for s in todo))
        order.append(ready)
        todo.remove(ready)
    return order


def input_digests(name: str, config: RunConfig) -> dict[str, str]:
    """Content hashes of the input files the stage ``name`` declares (see ``Stage.inputs``)."""
    from constitutional_ai.data.readers import local_input_digests

    values: dict[str, Any] = {}
    for dotted in get(name).inputs:
        node: Any = config
        for part in dotted.split("."):
            node = getattr(node, part, None) if node is not None else None
        values[dotted] = node
    return local_input_digests(values)


def inputs_identity(name: str, config: RunConfig) -> dict[str, Any]:
    """``{"inputs": digests}`` for a record store's identity, or nothing when the stage reads no file
    of the user's (so stores made before input hashing keep their identity)."""
    digests = input_digests(name, config) if name in _REGISTRY else {}
    return {"inputs": digests} if digests else {}


def pipeline_flags() -> tuple[set[str], set[str]]:
    """``(sections, wired fields)`` of `cai run`: what its stages read, less what it sets itself."""
    order = pipeline_order()
    sections = {s for stage in order for s in stage.flag_sections}
    return sections, {path for stage in order for path in stage.wired}


def report_sections() -> list[tuple[str, ReportSpec]]:
    """``(stage name, what the report shows for it)``: pipeline stages in order, then the others."""
    ordered = pipeline_order() + [s for s in stages() if not s.pipeline]
    return [(s.name, s.report) for s in ordered if s.report is not None]


def upstream(stage: Stage, order: list[Stage]) -> list[str]:
    """Names of the pipeline stages whose outputs ``stage`` consumes (its identity includes theirs)."""
    producer = {entry: s.name for s in order for entry in s.produces}
    names = [producer[e] for e in stage.consumes if e in producer and producer[e] != stage.name]
    return list(dict.fromkeys(names))  # in the order declared: the identity hash depends on it
