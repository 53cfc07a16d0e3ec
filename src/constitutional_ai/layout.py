"""The run layout: every path inside a run directory, and every ``run:`` name, defined here once.

A stage never spells a path: it asks ``RunLayout(config.output_dir).sft_model``. A run directory
is then readable from this one page, and moving a file is a one-line change that every reader
and writer follows. The entries are also the names that stages declare as their inputs and
outputs in the registry (``consumes=("sft_data",)``), so the pipeline's order and the layout can
never disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, overload

from constitutional_ai.data.store import RECORDS

#: Files inside a model folder (a run's or one passed with ``--pm DIR``), read wherever the folder is.
PM_INFO = "pm_info.json"
SFT_INFO = "sft_info.json"
PM_EVAL_RESULTS = "eval_results.json"
#: Beside a generation stage's records: the config and the constitution it was run with.
STAGE_CONFIG = "config.yaml"
STAGE_CONSTITUTION = "constitution.yaml"


class _Entry:
    """One path of the layout, relative to the run directory; read on a layout, it is a ``Path``."""

    def __init__(self, relative: str, doc: str):
        self.relative = relative
        self.doc = doc

    def __set_name__(self, owner: type[RunLayout], name: str) -> None:
        owner.ENTRIES = {**owner.ENTRIES, name: self.relative}

    @overload
    def __get__(self, layout: None, owner: Any) -> _Entry: ...
    @overload
    def __get__(self, layout: RunLayout, owner: Any) -> Path: ...
    def __get__(self, layout: RunLayout | None, owner: Any) -> Path | _Entry:
        return self if layout is None else layout.root / self.relative


class RunLayout:
    """Where each thing of one run lives, relative to its ``output_dir``."""

    ENTRIES: ClassVar[dict[str, str]] = {}

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
    pairs = _Entry("pairs", "sample-pairs record store: K responses per prompt")
    pairs_records = _Entry(f"pairs/{RECORDS}", "one record per prompt, with every pair to compare")
    labels = _Entry("labels", "label record store: the feedback model's soft labels")
    labels_records = _Entry(f"labels/{RECORDS}", "one record per comparison")
    preferences = _Entry("preferences/train.jsonl", "TRL preference rows with p_chosen (run:preferences)")
    pm = _Entry("pm", "train-pm record store: logged steps, manifest, checkpoints/")
    pm_model = _Entry("pm/model", "the preference model, with pm_info.json and eval_results.json")
    pm_eval = _Entry(f"pm/model/{PM_EVAL_RESULTS}", "PM accuracy and calibration on held-out pairs")
    pm_plot = _Entry("pm/model/eval_results_reliability.png", "PM reliability diagram on held-out pairs")
    rl = _Entry("rl", "RL record store: one record per update")
    rl_records = _Entry(f"rl/{RECORDS}", "reward, KL and losses per update")
    rl_model = _Entry("rl/model", "the RL-CAI policy (run:rl)")
    dpo = _Entry("dpo", "DPO record store")
    dpo_model = _Entry("dpo/model", "the DPO policy (run:dpo)")
    eval = _Entry("eval", "cai eval record store: every checkpoint's answers")
    eval_records = _Entry(f"eval/{RECORDS}", "one record per (prompt set, checkpoint, prompt)")
    elo = _Entry("eval/elo.json", "Elo per prompt set with bootstrap intervals, and the curves' figures")
    elo_plot = _Entry("eval/elo.png", "harmlessness against helpfulness Elo")
    revisions_plot = _Entry("eval/revisions.png", "PM score after each critique-revision round")
    rl_reward_plot = _Entry("eval/rl_reward.png", "reward, KL and response length over RL training")
    eval_labeler = _Entry("eval_labeler", "eval-labeler record store")
    labeler_results = _Entry("eval_labeler/results.json", "labeler accuracy, calibration, position bias")
    labeler_plot = _Entry("eval_labeler/reliability.png", "labeler reliability diagram")

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def add_entry(cls, name: str, relative: str, doc: str) -> None:
        """Declare a new entry (a plug-in stage's output); the layout stays the one place paths live."""
        if name in cls.ENTRIES and cls.ENTRIES[name] != relative:
            raise ValueError(f"run-layout entry {name!r} already means {cls.ENTRIES[name]!r}")
        entry = _Entry(relative, doc)
        setattr(cls, name, entry)
        entry.__set_name__(cls, name)

    def path(self, entry: str) -> Path:
        """An entry by name (as stages declare them in the registry)."""
        if entry not in self.ENTRIES:
            raise KeyError(f"{entry!r} is not a run-layout entry; known: {', '.join(sorted(self.ENTRIES))}")
        return self.root / self.ENTRIES[entry]

    # -- run: names ------------------------------------------------------------------------------
    #: ``run:`` data names a config may use in place of a file, and the entry each one means.
    RUN_DATA: ClassVar[dict[str, str]] = {"run:sft": "sft_data", "run:preferences": "preferences"}
    #: ``run:`` checkpoint names (``eval.models``); ``run:initial`` is the configured policy model itself.
    RUN_MODELS: ClassVar[dict[str, str]] = {"run:sft": "sft_model", "run:rl": "rl_model", "run:dpo": "dpo_model"}

    def run_data(self, spec: str) -> Path | None:
        """The file a ``run:`` data name stands for in this run, or None when ``spec`` is not one."""
        entry = self.RUN_DATA.get(spec)
        return None if entry is None else self.path(entry)

    def run_model(self, spec: str) -> Path | None:
        """The checkpoint a ``run:`` model name stands for in this run, or None when ``spec`` is not one."""
        entry = self.RUN_MODELS.get(spec)
        return None if entry is None else self.path(entry)

    @staticmethod
    def checkpoints(directory: Path) -> Path:
        """Where a training stage keeps its resumable trainer checkpoints."""
        return directory / "checkpoints"
