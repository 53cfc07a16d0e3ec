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
    #: Part of the RL loop that iterated online RL-CAI repeats (``rl.iterations``): `cai run` runs it
    #: once per iteration, as ``name@K`` from iteration 2, reading and writing its iteration's entries.
    iterated: bool = False
    #: Per-iteration entries an iterated stage reads from the iteration before (iteration 2's pairs
    #: come from iteration 1's RL policy).
    from_previous: tuple[str, ...] = ()
    #: What else decides its output under a config, beyond its sections (RL rewarded by the
    #: feedback model: the feedback section and the constitution): part of its identity when not empty.
    extra_identity: Callable[[RunConfig], dict[str, Any]] | None = None
    #: Whether `cai run` runs it under a config (the PM loop is not run when RL rewards come from
    #: the feedback model itself); unset: always.
    when: Callable[[RunConfig], bool] | None = None

    @property
    def flag_sections(self) -> tuple[str, ...]:
        """The config sections its command offers as flags: what it reads, and ``hub`` when it makes an
        exportable dataset or model (its ``--push-to-hub``)."""
        from constitutional_ai.artifacts import exportable

        read = (s for s in (*self.sections, *self.options) if s not in self.unread)
        hub = ("hub",) if exportable(self.produces) else ()
        iteration = ("iteration",) if self.iterated else ()  # `cai ppo --iteration 2`: one iteration by hand
        return tuple(dict.fromkeys((*COMMON_FIELDS, *iteration, *read, *hub)))

    def __post_init__(self) -> None:
        for entry in (*self.consumes, *self.produces):
            if not RunLayout.known(entry):
                raise ValueError(f"stage {self.name!r}: {entry!r} is not a RunLayout entry")
        if self.iterated and not all(RunLayout.split_name(e)[0] in RunLayout.PER_ITERATION for e in self.produces):
            raise ValueError(f"stage {self.name!r} is iterated: every entry it produces must be per_iteration, or "
                             "each iteration would overwrite the one before")


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


def at_iteration(stage: Stage, k: int) -> Stage:
    """An iterated stage at iteration ``k``: named ``name@k`` from iteration 2, consuming and
    producing that iteration's entries (and ``from_previous`` ones of iteration ``k - 1``), and run
    with ``iteration: k`` before its own wiring."""
    from dataclasses import replace

    own = tuple(RunLayout.at_iteration(e, k) for e in stage.consumes)
    previous = tuple(RunLayout.at_iteration(e, k - 1) for e in stage.from_previous) if k > 1 else ()

    def wire(config: RunConfig, layout: RunLayout) -> RunConfig:
        config = config.model_copy(update={"iteration": k})
        return stage.wire(config, layout.at(k)) if stage.wire is not None else config

    return replace(stage, name=stage.name if k == 1 else f"{stage.name}@{k}", consumes=own + previous,
                   produces=tuple(RunLayout.at_iteration(e, k) for e in stage.produces), wire=wire)


def after_loop(stage: Stage, last: int) -> Stage:
    """A stage outside the RL loop that reads its outputs reads the last iteration's (the eval
    compares every iteration's policy, judged by the last PM), with ``iteration: last``."""
    from dataclasses import replace

    if not any(RunLayout.split_name(e)[0] in RunLayout.PER_ITERATION for e in stage.consumes):
        return stage

    def wire(config: RunConfig, layout: RunLayout) -> RunConfig:
        config = config.model_copy(update={"iteration": last})
        return stage.wire(config, layout.at(last)) if stage.wire is not None else config

    return replace(stage, consumes=tuple(RunLayout.at_iteration(e, last) for e in stage.consumes), wire=wire)


def run_order(config: RunConfig) -> list[Stage]:
    """The stages `cai run` runs under ``config``, in order: the pipeline's (less those its
    ``when`` leaves out), with the RL loop repeated ``rl.iterations`` times."""
    base = [s for s in pipeline_order() if s.when is None or s.when(config)]
    iterations = config.rl.iterations
    loop = [s for s in base if s.iterated]
    if not loop:
        return base
    end = max(base.index(s) for s in loop) + 1
    candidates = [at_iteration(s, 1) if s.iterated else after_loop(s, iterations) for s in base[:end]]
    candidates += [at_iteration(s, k) for k in range(2, iterations + 1) for s in loop]
    candidates += [after_loop(s, iterations) for s in base[end:]]
    return pipeline_order(candidates)


def input_digests(name: str, config: RunConfig) -> dict[str, str]:
    """Content hashes of the input files the stage ``name`` declares (see ``Stage.inputs``)."""
    from constitutional_ai.data.readers import local_input_digests

    values: dict[str, Any] = {}
    for dotted in get(name.partition("@")[0]).inputs:
        node: Any = config
        for part in dotted.split("."):
            node = getattr(node, part, None) if node is not None else None
        values[dotted] = node
    return local_input_digests(values)


def inputs_identity(name: str, config: RunConfig) -> dict[str, Any]:
    """``{"inputs": digests}`` for a record store's identity, or nothing when the stage reads no file
    of the user's (so stores made before input hashing keep their identity)."""
    digests = input_digests(name, config) if name.partition("@")[0] in _REGISTRY else {}
    return {"inputs": digests} if digests else {}


def pipeline_flags() -> tuple[set[str], set[str]]:
    """``(sections, wired fields)`` of `cai run`: what its stages read, less what it sets itself."""
    order = pipeline_order()
    sections = {s for stage in order for s in stage.flag_sections}
    wired = {path for stage in order for path in stage.wired}
    return sections, wired | ({"iteration"} if any(s.iterated for s in order) else set())  # run_order sets it


def report_sections() -> list[tuple[str, ReportSpec]]:
    """``(stage name, what the report shows for it)``: pipeline stages in order, then the others."""
    ordered = pipeline_order() + [s for s in stages() if not s.pipeline]
    return [(s.name, s.report) for s in ordered if s.report is not None]


def upstream(stage: Stage, order: list[Stage]) -> list[str]:
    """Names of the pipeline stages whose outputs ``stage`` consumes (its identity includes theirs)."""
    producer = {entry: s.name for s in order for entry in s.produces}
    names = [producer[e] for e in stage.consumes if e in producer and producer[e] != stage.name]
    return list(dict.fromkeys(names))  # in the order declared: the identity hash depends on it
