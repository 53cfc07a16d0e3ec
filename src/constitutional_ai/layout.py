"""The run layout: every path inside a run directory, and every ``run:`` name, defined here once.

A stage never spells a path: it asks ``RunLayout(config.output_dir).sft_model``. A run directory
is then readable from this one page, and moving a file is a one-line change that every reader
and writer follows. The entries are also the names that stages declare as their inputs and
outputs in the registry (``consumes=("sft_data",)``), so the pipeline's order and the layout can
never disagree.

Iterated online RL-CAI (``rl.iterations``) repeats the RL loop (pairs, labels, PM, RL): the loop's
entries are *per iteration*. Iteration 1 keeps them where a one-iteration run has them; iteration
``k`` has them under ``iterations/k/``. ``RunLayout(root, iteration=k)`` (or :meth:`RunLayout.of`
on a config) reads them there, and an entry name may carry its iteration (``"pm_model@2"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, overload

from constitutional_ai.data.store import RECORDS

#: Files inside a model folder (a run's or one passed with ``--pm DIR``), read wherever the folder is.
PM_INFO = "pm_info.json"
SFT_INFO = "sft_info.json"
PM_EVAL_RESULTS = "eval_results.json"
PM_EVAL_NEWEST = "eval_results_newest.json"
#: Beside a generation stage's records: the config and the constitution it was run with.
STAGE_CONFIG = "config.yaml"
STAGE_CONSTITUTION = "constitution.yaml"
#: Where iteration k >= 2 of the RL loop keeps its per-iteration entries.
ITERATIONS = "iterations"


class _Entry:
    """One path of the layout, relative to the run directory; read on a layout, it is a ``Path``."""

    def __init__(self, relative: str, doc: str, per_iteration: bool = False):
        self.relative = relative
        self.doc = doc
        self.per_iteration = per_iteration

    def __set_name__(self, owner: type[RunLayout], name: str) -> None:
        owner.ENTRIES = {**owner.ENTRIES, name: self.relative}
        if self.per_iteration:
            owner.PER_ITERATION = owner.PER_ITERATION | {name}

    @overload
    def __get__(self, layout: None, owner: Any) -> _Entry: ...
    @overload
    def __get__(self, layout: RunLayout, owner: Any) -> Path: ...
    def __get__(self, layout: RunLayout | None, owner: Any) -> Path | _Entry:
        if layout is None:
            return self
        return (layout.iteration_root if self.per_iteration else layout.root) / self.relative


class RunLayout:
    """Where each thing of one run lives, relative to its ``output_dir``."""

    ENTRIES: ClassVar[dict[str, str]] = {}
    #: The entries of the RL loop, one of each per iteration (see the module docstring).
    PER_ITERATION: ClassVar[frozenset[str]] = frozenset()

    config = _Entry("config.yaml", "the resolved config the run was last started with")
    pipeline = _Entry("pipeline.json", "cai run: each stage's identity, status and seconds")
    report = _Entry("report.html", "cai report: the HTML page")
    report_md = _Entry("report.md", "cai report: the Markdown summary")
    summary = _Entry("summary.json", "cai run: total and per-stage time, what each stage made, headline figures")
    log = _Entry("cai.log", "everything the libraries said (logs, warnings, their progress), every command")

    critique = _Entry("critique", "SL-CAI record store: initial response, critiques and revisions per prompt")
    critique_records = _Entry(f"critique/{RECORDS}", "one record per red-team prompt")
    sft_data = _Entry("sft/train.jsonl", "export-sft: conversations in TRL's messages format (run:sft)")
    sft_trainer = _Entry("sft/trainer", "SFT record store: logged steps, manifest, checkpoints/")
    sft_model = _Entry("sft/model", "the SL-CAI policy (run:sft as a checkpoint)")
    pairs = _Entry("pairs", "sample-pairs record store: K responses per prompt", per_iteration=True)
    pairs_records = _Entry(f"pairs/{RECORDS}", "one record per prompt, with every pair to compare", per_iteration=True)
    labels = _Entry("labels", "label record store: the feedback model's soft labels", per_iteration=True)
    labels_records = _Entry(f"labels/{RECORDS}", "one record per comparison", per_iteration=True)
    preferences = _Entry("preferences/train.jsonl", "TRL preference rows with p_chosen (run:preferences)",
                         per_iteration=True)
    pm = _Entry("pm", "train-pm record store: logged steps, manifest, checkpoints/", per_iteration=True)
    pm_model = _Entry("pm/model", "the preference model, with pm_info.json and eval_results.json", per_iteration=True)
    pm_eval = _Entry(f"pm/model/{PM_EVAL_RESULTS}", "PM accuracy and calibration on held-out pairs", per_iteration=True)
    pm_eval_newest = _Entry(f"pm/model/{PM_EVAL_NEWEST}", "iterations 2+: PM accuracy on the newest policy's "
                            "pairs for the held-out prompts", per_iteration=True)
    pm_plot = _Entry("pm/model/eval_results_reliability.png", "PM reliability diagram on held-out pairs",
                     per_iteration=True)
    rl = _Entry("rl", "RL record store: one record per update", per_iteration=True)
    rl_records = _Entry(f"rl/{RECORDS}", "reward, KL and losses per update", per_iteration=True)
    rl_model = _Entry("rl/model", "the RL-CAI policy (run:rl)", per_iteration=True)
    rl_references = _Entry("rl/references.json", "reward feedback, pairwise: the starting policy's greedy answer "
                                                 "to each prompt, by prompt key", per_iteration=True)
    rl_rewards = _Entry("rl/rewards.jsonl", "reward feedback with rloo/grpo: each reward's principle and score "
                                            "(ppo keeps them in its step records)", per_iteration=True)
    dpo = _Entry("dpo", "DPO record store")
    dpo_model = _Entry("dpo/model", "the DPO policy (run:dpo)")
    eval = _Entry("eval", "cai eval record store: every checkpoint's answers")
    eval_records = _Entry(f"eval/{RECORDS}", "one record per (prompt set, checkpoint, prompt)")
    elo = _Entry("eval/elo.json", "Elo per prompt set with bootstrap intervals, and the curves' figures")
    elo_plot = _Entry("eval/elo.png", "harmlessness against helpfulness Elo")
    revisions_plot = _Entry("eval/revisions.png", "PM score after each critique-revision round")
    rl_reward_plot = _Entry("eval/rl_reward.png", "reward, KL and response length over RL training")
    export = _Entry("export", "cai export: the run's datasets and models as Hub-ready folders")
    verl_data = _Entry("verl/train.parquet", "cai rl-data: the prompts as verl's RL dataset (data.train_files)")
    verl_val_data = _Entry("verl/val.parquet", "cai rl-data: the held-out prompts for verl's data.val_files")
    openrlhf_data = _Entry("openrlhf/train.jsonl", "cai rl-data: the prompts for OpenRLHF's --prompt_data "
                                                   "(--input_key messages or prompt)")
    openrlhf_eval_data = _Entry("openrlhf/eval.jsonl", "cai rl-data: the held-out prompts for OpenRLHF's "
                                                       "--eval_dataset")
    eval_labeler = _Entry("eval_labeler", "eval-labeler record store")
    labeler_results = _Entry("eval_labeler/results.json", "labeler accuracy, calibration, position bias")
    labeler_plot = _Entry("eval_labeler/reliability.png", "labeler reliability diagram")

    def __init__(self, root: str | Path, iteration: int = 1):
        self.root = Path(root)
        if iteration < 1:
            raise ValueError(f"iteration {iteration}: iterations count from 1")
        self.iteration = iteration

    @classmethod
    def of(cls, config: Any) -> RunLayout:
        """The layout a stage running with ``config`` reads and writes: its run, at its iteration."""
        return cls(config.output_dir, getattr(config, "iteration", 1))

    @property
    def iteration_root(self) -> Path:
        """Where this iteration's per-iteration entries live (the run root for iteration 1)."""
        return self.root if self.iteration == 1 else self.root / ITERATIONS / str(self.iteration)

    def at(self, iteration: int) -> RunLayout:
        """The same run at another iteration."""
        return RunLayout(self.root, iteration)

    def iterations(self) -> list[int]:
        """The iterations this run has started: 1, then every ``iterations/k`` folder, in order, up to
        the ``rl.iterations`` its last ``cai run`` asked for (a folder left by an earlier run with more
        iterations is not part of this one: not evaluated, reported or exported)."""
        found = [int(p.name) for p in (self.root / ITERATIONS).glob("*") if p.is_dir() and p.name.isdigit()]
        limit = self._configured_iterations()
        return [1, *sorted(k for k in found if k >= 2 and (limit is None or k <= limit))]

    def _configured_iterations(self) -> int | None:
        import yaml

        try:
            data = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        value = data.get("rl", {}).get("iterations") if isinstance(data, dict) and isinstance(data.get("rl"), dict) \
            else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None

    def latest(self, entry: str) -> RunLayout:
        """The layout at the last iteration that has made ``entry`` (a file or a folder), or this one
        when none has (or ``entry`` is not part of the RL loop): where "this run's PM" or "its RL curves"
        are once the loop has iterated."""
        if self.split_name(entry)[0] not in self.PER_ITERATION:
            return self
        return next((self.at(k) for k in reversed(self.iterations()) if self.at(k).path(entry).exists()), self)

    @staticmethod
    def split_name(entry: str) -> tuple[str, int | None]:
        """``"pm_model@2"`` -> ``("pm_model", 2)``; a name without ``@`` has no iteration of its own."""
        name, sep, k = entry.partition("@")
        if not sep:
            return entry, None
        if not k.isdigit() or int(k) < 1 or name not in RunLayout.PER_ITERATION:
            raise KeyError(f"{entry!r}: only per-iteration entries take @K (K >= 1): "
                           f"{', '.join(sorted(RunLayout.PER_ITERATION))}")
        return name, int(k)

    @staticmethod
    def at_iteration(entry: str, iteration: int) -> str:
        """The name of ``entry`` at ``iteration`` (iteration 1's keeps the plain name)."""
        name, _ = RunLayout.split_name(entry)
        if name not in RunLayout.PER_ITERATION or iteration == 1:
            return name
        return f"{name}@{iteration}"

    @classmethod
    def known(cls, entry: str) -> bool:
        try:
            return cls.split_name(entry)[0] in cls.ENTRIES
        except KeyError:
            return False

    @classmethod
    def add_entry(cls, name: str, relative: str, doc: str, per_iteration: bool = False) -> None:
        """Declare a new entry (a plug-in stage's output; ``per_iteration`` for a stage of the RL
        loop); the layout stays the one place paths live."""
        if name in cls.ENTRIES and cls.ENTRIES[name] != relative:
            raise ValueError(f"run-layout entry {name!r} already means {cls.ENTRIES[name]!r}")
        entry = _Entry(relative, doc, per_iteration)
        setattr(cls, name, entry)
        entry.__set_name__(cls, name)

    def path(self, entry: str) -> Path:
        """An entry by name (as stages declare them in the registry), ``name@K`` at iteration K."""
        name, iteration = self.split_name(entry)
        if name not in self.ENTRIES:
            raise KeyError(f"{entry!r} is not a run-layout entry; known: {', '.join(sorted(self.ENTRIES))}")
        layout = self if iteration is None else self.at(iteration)
        root = layout.iteration_root if name in self.PER_ITERATION else self.root
        return root / self.ENTRIES[name]

    # -- run: names ------------------------------------------------------------------------------
    #: ``run:`` data names a config may use in place of a file, and the entry each one means.
    RUN_DATA: ClassVar[dict[str, str]] = {"run:sft": "sft_data", "run:preferences": "preferences"}
    #: ``run:`` checkpoint names (``eval.models``); ``run:initial`` is the configured policy model itself.
    RUN_MODELS: ClassVar[dict[str, str]] = {"run:sft": "sft_model", "run:rl": "rl_model", "run:dpo": "dpo_model",
                                            "run:pm": "pm_model"}

    def _run_name(self, spec: str, table: dict[str, str]) -> Path | None:
        base, sep, k = spec.partition("@")
        entry = table.get(base)
        if entry is None or (sep and not (k.isdigit() and int(k) >= 1 and entry in self.PER_ITERATION)):
            return None
        return self.path(f"{entry}@{k}" if sep else entry)

    def run_data(self, spec: str) -> Path | None:
        """The file a ``run:`` data name stands for in this run (``run:preferences@2``: iteration 2's),
        or None when ``spec`` is not one."""
        return self._run_name(spec, self.RUN_DATA)

    def run_model(self, spec: str) -> Path | None:
        """The checkpoint a ``run:`` model name stands for in this run (``run:rl@2``: iteration 2's),
        or None when ``spec`` is not one."""
        return self._run_name(spec, self.RUN_MODELS)

    def resolve_model(self, name: str) -> str:
        """``name`` as a loadable location: a ``run:`` model name (``run:rl@1``: iteration 1's RL policy)
        becomes its folder in this run, which must exist; anything else is returned as is. Iterations
        name the model they continue by ``run:`` name, so their identity does not depend on where the
        run directory is, or on whether that model was already there when the identity was taken."""
        path = self.run_model(name)
        if path is None:
            return name
        if not path.is_dir():
            from constitutional_ai.common.errors import ConfigError

            raise ConfigError(f"{name}: {path} does not exist yet; run the stage that makes it first (cai run)")
        return str(path)

    @staticmethod
    def checkpoints(directory: Path) -> Path:
        """Where a training stage keeps its resumable trainer checkpoints."""
        return directory / "checkpoints"
