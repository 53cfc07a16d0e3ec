"""What a run can publish: each exportable run-layout entry, whether it is a dataset or a model, and
what its card says. This table is the one home of "what is exportable": ``cai export``, the
``--push-to-hub`` of stage commands and the cards all read it, so a new artifact is one row here.

It imports nothing heavy (no ``huggingface_hub``, ``datasets`` or ``transformers``): the stage
registry reads it to decide which commands offer the ``hub`` flags.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from constitutional_ai.config import ExportArtifact
from constitutional_ai.layout import PM_INFO, SFT_INFO, RunLayout

Kind = Literal["dataset", "model"]

#: Where ``cai export`` writes when ``export.output`` is empty.
EXPORT_ENTRY = "export"


@dataclass(frozen=True)
class Artifact:
    """One exportable entry and how its folder and card are built.

    ``store`` is the record store of the stage that made it: its manifest says whether that stage
    finished, and its config snapshot (or recorded config fields) is what the card shows.
    ``constitution_from`` are the stores whose constitution snapshot shaped it, first found wins:
    a PM and an RL policy answer to the constitution the labels were made under.
    """

    name: str
    kind: Kind
    title: str
    made_by: str  # the command that writes it
    description: str
    sections: tuple[str, ...]  # config sections the card's excerpt shows
    constitution_from: tuple[str, ...]
    store: str | None = None
    metrics: tuple[str, ...] = ()  # names of the card's metric readers (cards.METRICS)
    info: str | None = None  # a model folder's own facts file (base model, sources, counts)
    required: tuple[str, ...] = ()  # fields every dataset row must have
    count_by: tuple[str, ...] = ()  # dataset row fields whose values the card counts
    trained_on: tuple[str, ...] = ()  # artifacts a model was trained on (linked when pushed together)
    elo_name: str | None = None  # this checkpoint's name in eval/elo.json
    task: str = "text-generation"  # a dataset's task_categories, a model's pipeline_tag
    fields: tuple[tuple[str, str], ...] = ()  # a dataset's columns, described on its card
    intended_use: str = ""
    limitations: str = ""

    @property
    def repo_type(self) -> str:
        return self.kind

    @property
    def slug(self) -> str:
        """The artifact's name in a Hub repository id (``PREFIX-sft-model``)."""
        return self.name.replace("_", "-")


_AI_LABELS = ("The labels are a model's judgements under one written constitution, not human ones: they "
              "inherit that model's biases (position, length, style) and the constitution's blind spots.")

ARTIFACTS: dict[str, Artifact] = {a.name: a for a in (
    Artifact(
        name="sft_data", kind="dataset", title="SL-CAI conversations", made_by="export-sft",
        description="Red-team prompts each answered with the policy's own revision after it critiqued its first "
                    "answer against the constitution (supervised Constitutional AI), optionally mixed with "
                    "helpfulness conversations; in TRL's conversational `messages` format.",
        sections=("seed", "constitution", "policy", "prompts", "critique", "sft_export"),
        constitution_from=("critique",), store="critique", required=("messages",), count_by=("source",),
        fields=(("messages", "the conversation: the prompt's turns, then the revised assistant answer"),
                ("source", "`critique` (a revision) or `helpful` (a helpfulness conversation mixed in)"),
                ("key", "the prompt's key and the revision round (`KEY:rN`)"),
                ("constitution_hash", "sha256 of the constitution the revision was made under (null: helpful)")),
        intended_use="Supervised fine-tuning (TRL `SFTTrainer`) of a helpful model towards harmless answers, and "
                     "auditing what the critique-revision loop did to each prompt.",
        limitations="Revisions are the same model's rewrites: they are only as good as that model's critiques. "
                    "The prompts are red-team prompts, so the data holds harmful requests by design."),
    Artifact(
        name="preferences", kind="dataset", title="RL-CAI AI-feedback preferences", made_by="label",
        description="Pairs of the policy's responses to one prompt, each judged by a feedback model against a "
                    "principle sampled from the constitution (RLAIF); `p_chosen` is the soft label, the "
                    "probability the feedback model gave the chosen response. TRL's conversational preference "
                    "format.",
        sections=("seed", "constitution", "policy", "prompts", "pairs", "feedback"),
        constitution_from=("labels",), store="labels", metrics=("labeler",),
        required=("prompt", "chosen", "rejected", "p_chosen"), count_by=("labeler_id",),
        fields=(("prompt", "the conversation so far (messages)"),
                ("chosen", "the preferred assistant turn (messages)"),
                ("rejected", "the other assistant turn (messages)"),
                ("p_chosen", "the feedback model's probability that `chosen` is better (a soft label)"),
                ("key", "the prompt, pair and principle this comparison came from"),
                ("labeler_id", "the feedback model"),
                ("constitution_hash", "sha256 of the constitution the label was made under")),
        intended_use="Training a preference (reward) model with soft labels, or DPO-style training on "
                     "`chosen`/`rejected`; studying AI feedback against a written constitution.",
        limitations=_AI_LABELS),
    Artifact(
        name="sft_model", kind="model", title="SL-CAI policy", made_by="sft",
        description="The policy fine-tuned on its own constitution-guided revisions (supervised Constitutional "
                    "AI): the starting point of RL-CAI.",
        sections=("seed", "sft"), constitution_from=("critique",), store="sft_trainer", metrics=("elo",),
        info=SFT_INFO, trained_on=("sft_data",), elo_name="sft", task="text-generation",
        intended_use="Research on Constitutional AI; the starting policy for RL from AI feedback; comparing "
                     "against the base and RL policies.",
        limitations="Trained to revise towards one written constitution, by the model's own critiques: it is "
                    "not safety-tested and can still produce harmful text."),
    Artifact(
        name="pm_model", kind="model", title="Constitutional AI preference model", made_by="train-pm",
        description="A sequence classifier scoring a conversation and response (one scalar, higher is better), "
                    "trained with a Bradley-Terry loss on soft AI-feedback labels; the RL-CAI reward.",
        sections=("seed", "pm"), constitution_from=("labels",), store="pm", metrics=("pm",), info=PM_INFO,
        trained_on=("preferences",), task="text-classification",
        intended_use="The reward of RL from AI feedback (PPO, RLOO, GRPO; OpenRLHF via `cai serve-pm`); "
                     "ranking or filtering responses by the constitution's preferences.",
        limitations="A reward model learnt from AI labels is easy to exploit: a policy optimised hard against it "
                    "finds responses it over-rates. Its scores are only comparable between responses to the "
                    "same prompt. " + _AI_LABELS),
    Artifact(
        name="rl_model", kind="model", title="RL-CAI policy", made_by="ppo",
        description="The SL-CAI policy trained with reinforcement learning from AI feedback: against the "
                    "preference model (RL-CAI), or, where the config below says `reward: feedback`, against the "
                    "feedback model's own judgement (direct RLAIF).",
        sections=("seed", "prompts", "rl"), constitution_from=("labels", "critique"), store="rl",
        metrics=("elo", "rl"), elo_name="rl", task="text-generation",
        intended_use="Research on Constitutional AI and RLAIF: comparing harmlessness and helpfulness against "
                     "the SFT and base policies.",
        limitations="Optimised against an AI judge's reward: it may exploit the preference model (or the "
                    "feedback model) rather than follow the constitution, and it is not safety-tested."),
)}

if set(ARTIFACTS) != set(typing.get_args(ExportArtifact)):  # the config's choices and this table are one list
    raise RuntimeError("config.ExportArtifact and artifacts.table.ARTIFACTS name different artifacts")
EXPORTABLE = frozenset(ARTIFACTS)


def exportable(entries: Iterable[str]) -> list[str]:
    """The artifacts among run-layout ``entries`` (``preferences@2`` counts as ``preferences``), in order."""
    names = (e.partition("@")[0] for e in entries)
    return list(dict.fromkeys(n for n in names if n in ARTIFACTS))


def artifact_layout(run_dir: str | Path, name: str) -> RunLayout:
    """The run's layout at the iteration the artifact ``name`` comes from: the last iteration of the RL
    loop (``rl.iterations``) that made it, iteration 1 for anything outside the loop. Everything read
    about an artifact (its stage's store, constitution snapshot, metrics) is read through it."""
    return RunLayout(run_dir).latest(name)


def artifact_path(run_dir: str | Path, name: str) -> Path:
    """Where the artifact ``name`` (a table key, which is its run-layout entry) lives in a run: the one
    place export resolves it."""
    return artifact_layout(run_dir, name).path(name)


def made(run_dir: str | Path) -> list[str]:
    """The artifacts this run has made (a dataset file or a model folder is there), in table order."""
    return [name for name in ARTIFACTS if _present(artifact_path(run_dir, name), ARTIFACTS[name].kind)]



def _present(path: Path, kind: Kind) -> bool:
    return path.is_file() if kind == "dataset" else path.is_dir()
