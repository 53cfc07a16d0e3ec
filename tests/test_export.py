"""``cai export`` and ``--push-to-hub``: Hub-ready folders that load back as they are, cards that
parse and carry the constitution hash and the metrics, and a push path that sends the right
repository, folder, privacy and token without ever writing or printing the token.

The run is built by hand (tiny models, a few JSONL rows): no pipeline, no network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from constitutional_ai.artifacts import ARTIFACTS, exportable
from constitutional_ai.artifacts import push as push_module
from constitutional_ai.artifacts.folders import export_artifacts
from constitutional_ai.artifacts.push import PushError, check_repo_id, push_folder
from constitutional_ai.cli import app
from constitutional_ai.common.errors import ConfigError, DataError
from constitutional_ai.common.hub import hub_offline_reason
from constitutional_ai.config import HubConfig, RunConfig
from constitutional_ai.constitution import Constitution
from constitutional_ai.layout import PM_EVAL_RESULTS, PM_INFO, SFT_INFO, STAGE_CONSTITUTION, RunLayout
from constitutional_ai.stages import registry

runner = CliRunner()
SECRET = "hf_test_SECRET_do_not_leak_0123456789"
HASH = Constitution.default().hash


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _label_rows(n: int) -> list[dict]:
    """Rows as ``cai label`` keeps them (``stages/feedback.labels_to_preferences`` reads these)."""
    return [{"key": f"p{i}:0-1:harm", "prompt": [{"role": "user", "content": f"How do I do thing {i}?"}],
             "chosen": "A safe answer.", "rejected": "A risky answer.", "p_chosen": 0.5 + i / (2 * n),
             "labeler_id": "judge", "constitution_hash": HASH} for i in range(n)]


def _preference_rows(n: int) -> list[dict]:
    return [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}], "p_chosen": r["p_chosen"],
             "key": r["key"], "labeler_id": r["labeler_id"], "constitution_hash": HASH} for r in _label_rows(n)]


def _sft_rows(n: int) -> list[dict]:
    """Rows as ``data/export.critique_to_sft`` writes them."""
    return [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"A careful revision {i}."}],
             "source": "critique" if i % 4 else "helpful", "key": f"k{i}:r1",
             "constitution_hash": HASH if i % 4 else None} for i in range(n)]


def make_run(root: Path, causal_lm: Path, classifier: Path) -> Path:
    """A finished run, as the stages leave it, without running them."""
    layout = RunLayout(root)
    root.mkdir(parents=True)
    RunConfig(output_dir=str(root)).to_yaml(layout.config)
    for store in (layout.critique, layout.labels):
        store.mkdir(parents=True, exist_ok=True)
        Constitution.default().save(str(store / STAGE_CONSTITUTION))
    _json(layout.labels / "manifest.json", {"status": "complete", "records": 12})
    _jsonl(layout.sft_data, _sft_rows(8))
    _jsonl(layout.preferences, _preference_rows(12))
    shutil.copytree(causal_lm, layout.sft_model)
    _json(layout.sft_model / SFT_INFO, {"base_model": "embedded:tiny-demo", "examples": 8, "global_step": 1,
                                        "train_loss": 4.6, "train_seconds": 1.0})
    _json(layout.sft_trainer / "manifest.json", {"status": "complete", "fields": {"seed": 0, "sft.max_length": 512}})
    shutil.copytree(classifier, layout.pm_model)
    _json(layout.pm_model / PM_INFO, {
        "base_model": str(layout.sft_model), "train_pairs": 10, "eval_pairs": 2, "global_step": 2,
        "sources": [{"source": str(layout.preferences), "weight": 1.0, "read": 12, "kept": 12, "in_mix": 12,
                     "dropped": {}}], "constitution_hashes": [HASH]})
    _json(layout.pm_model / PM_EVAL_RESULTS, {"pairs": 40, "accuracy": 0.75, "ece": 0.05, "mean_margin": 0.3})
    _json(layout.pm / "manifest.json", {"status": "complete"})
    shutil.copytree(causal_lm, layout.rl_model)
    _json(layout.rl / "manifest.json", {"status": "complete", "algo": "ppo", "steps": 16, "first_reward": -0.2,
                                        "last_reward": 0.1, "last_kl": 0.3})
    _json(layout.labeler_results, {"labeler_id": str(layout.sft_model), "n": 24, "accuracy": 0.625, "ece": 0.04,
                                   "position_bias_rate": 0.5, "position_bias_n": 24})
    ratings = {"elo": {"initial": 0.0, "sft": 5.0, "rl": 20.0}, "lower": {"initial": 0.0, "sft": -1.0, "rl": 12.0},
               "upper": {"initial": 0.0, "sft": 11.0, "rl": 28.0}, "prompts": 32}
    _json(layout.elo, {"checkpoints": ["initial", "sft", "rl"], "harmless": ratings, "helpful": ratings,
                       "judge": "preference model"})
    return root


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a one-output score head: what ``cai train-pm`` saves."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("pm") / "model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every artifact of a hand-made run, exported once for the tests that read it."""
    run = make_run(tmp_path_factory.mktemp("run") / "run", tiny_model_dir, classifier_dir)
    written = export_artifacts(run)
    assert [e.name for e in written] == list(ARTIFACTS)
    return RunLayout(run).path("export")


def test_the_table_is_the_configs_list_and_decides_which_commands_offer_push_to_hub():
    from typing import get_args

    from constitutional_ai.config import ExportArtifact

    assert set(ARTIFACTS) == set(get_args(ExportArtifact))
    assert all(name in RunLayout.ENTRIES for name in ARTIFACTS)
    pushing = {s.command for s in registry.stages() if "hub" in s.flag_sections}
    assert {"export-sft", "sft", "label", "train-pm", "ppo", "export"} <= pushing
    assert not {"critique", "sample-pairs", "eval", "eval-labeler"} & pushing
    assert exportable(["pairs", "preferences@2", "sft_model"]) == ["preferences", "sft_model"]


def test_dataset_folders_load_back_with_load_dataset(exported: Path, tmp_path: Path):
    from datasets import load_dataset

    sft = load_dataset(str(exported / "sft_data"), cache_dir=str(tmp_path / "cache"))
    assert sft["train"].num_rows == 8 and sft["train"][1]["messages"][-1]["content"] == "A careful revision 1."
    prefs = load_dataset(str(exported / "preferences"), cache_dir=str(tmp_path / "cache"))["train"]
    assert prefs.num_rows == 12 and {"prompt", "chosen", "rejected", "p_chosen"} <= set(prefs.column_names)
    assert prefs[0]["p_chosen"] == pytest.approx(0.5)


def test_model_folders_load_back_with_from_pretrained(exported: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for name in ("sft_model", "rl_model"):
        assert AutoModelForCausalLM.from_pretrained(exported / name).num_parameters() > 0
        assert AutoTokenizer.from_pretrained(exported / name)("hello")["input_ids"]
    pm = AutoModelForSequenceClassification.from_pretrained(exported / "pm_model")
    assert pm.config.num_labels == 1 and (exported / "pm_model" / PM_EVAL_RESULTS).is_file()


def test_cards_parse_and_carry_the_constitution_hash_config_and_metrics_with_their_sample_sizes(exported: Path):
    from huggingface_hub import DatasetCard, ModelCard

    sft = DatasetCard.load(exported / "sft_data" / "README.md")
    assert sft.data.constitution_hash == HASH and sft.data.cai_artifact == "sft_data"
    assert {"constitutional-ai", "rlaif"} <= set(sft.data.tags)
    assert sft.data.configs[0]["data_files"][0]["path"] == "data/train.jsonl"
    for section in ("## Constitution", "## How it was made", "## Metrics", "## Intended use", "## Limitations"):
        assert section in sft.text
    assert Constitution.default().critique_revision[0].id in sft.text and "critique 6, helpful 2" in sft.text
    assert "sft_export:" in sft.text  # the config excerpt, as YAML
    prefs = DatasetCard.load(exported / "preferences" / "README.md")
    assert prefs.data.cai_metrics["labeler_accuracy"] == {"value": 0.625, "n": 24, "unit": "items with known answers",
                                                          "source": "eval_labeler/results.json"}
    assert "labeler sft/model" in prefs.text  # a path inside the run is written relative to it
    pm = ModelCard.load(exported / "pm_model" / "README.md")
    assert pm.data.library_name == "transformers" and pm.data.pipeline_tag == "text-classification"
    assert pm.data.constitution_hash == HASH and pm.data.base_model is None  # a local folder is no base_model
    assert pm.data.cai_metrics["pm_heldout_accuracy"]["value"] == 0.75
    assert pm.data.cai_metrics["pm_heldout_accuracy"]["n"] == 40
    assert "training pairs: 10" in pm.text and "Source `preferences/train.jsonl`" in pm.text
    rl = ModelCard.load(exported / "rl_model" / "README.md")
    assert rl.data.cai_metrics["elo_harmless"] == {"value": 20.0, "n": 32, "unit": "prompts",
                                                   "source": "eval/elo.json", "interval_95": [12.0, 28.0]}
    assert rl.data.cai_metrics["rl_last_reward"]["n"] == 16
    sft_model = ModelCard.load(exported / "sft_model" / "README.md")
    assert sft_model.data.cai_metrics["elo_harmless"]["value"] == 5.0 and "embedded:tiny-demo" in sft_model.text


def test_exporting_what_the_run_lacks_or_bad_rows_is_a_one_line_error(tmp_path: Path):
    run = tmp_path / "run"
    _jsonl(RunLayout(run).sft_data, _sft_rows(2))
    with pytest.raises(DataError, match=r"rl/model: this run has no rl_model .*`cai ppo --output-dir"):
        export_artifacts(run, names=["rl_model"])
    with pytest.raises(DataError, match="nothing to export"):
        export_artifacts(tmp_path)
    with pytest.raises(ConfigError, match="no such run directory"):
        export_artifacts(tmp_path / "absent")
    _jsonl(RunLayout(run).preferences, [*_preference_rows(2), {"prompt": [], "chosen": []}])
    with pytest.raises(DataError, match=r"preferences/train.jsonl:3: no rejected, p_chosen field"):
        export_artifacts(run, names=["preferences"])
    _jsonl(RunLayout(run).preferences, [{**_preference_rows(1)[0], "p_chosen": 1.5}])
    with pytest.raises(DataError, match=r"train.jsonl:1: p_chosen 1.5 is not a probability"):
        export_artifacts(run, names=["preferences"])
    assert not (RunLayout(run).path("export") / "preferences").exists()  # no half-written folder either
    _json(RunLayout(run).labels / "manifest.json", {"status": "incomplete"})
    _jsonl(RunLayout(run).preferences, _preference_rows(1))
    with pytest.raises(DataError, match="is not finished"):
        export_artifacts(run, names=["preferences"])


def test_a_folder_export_did_not_write_is_never_replaced(tmp_path: Path):
    run = tmp_path / "run"
    _jsonl(RunLayout(run).sft_data, _sft_rows(2))
    mine = tmp_path / "out" / "sft_data"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="was not written by cai export"):
        export_artifacts(run, tmp_path / "out")
    shutil.rmtree(mine)
    export_artifacts(run, tmp_path / "out")
    export_artifacts(run, tmp_path / "out")  # its own folder: replaced
    assert (mine / "data" / "train.jsonl").read_text().count("\n") == 2


def test_repository_ids_and_the_token_are_checked_with_one_line_errors(monkeypatch: pytest.MonkeyPatch):
    for bad in ("me/bad id", "no-namespace", "a/b/c", "me/x--y"):
        with pytest.raises(ConfigError, match="not a Hub repository id"):
            check_repo_id(bad)
    monkeypatch.delenv("MY_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="MY_TOKEN is not set"):
        push_folder(Path("."), "sft_data", "me/x", HubConfig(token_env="MY_TOKEN"))


class _Recorder:
    """``HfApi.create_repo``/``upload_folder`` replaced: each call kept, nothing sent."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        from huggingface_hub import HfApi

        self.repos: list[dict] = []
        self.uploads: list[dict] = []
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder.repos.append({"repo_id": repo_id, **kwargs})
            return f"https://huggingface.co/{'datasets/' if kwargs.get('repo_type') == 'dataset' else ''}{repo_id}"

        def upload_folder(api, **kwargs):
            recorder.uploads.append({**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"]).rglob("*"))})

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(push_module, "hub_offline_reason", lambda: None)  # the Hub "reachable"
        monkeypatch.setenv("HF_TOKEN", SECRET)


def _no_secret_under(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_cai_export_push_sends_each_artifact_to_prefix_artifact_with_the_token_from_the_environment(
        tiny_model_dir: Path, classifier_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = _Recorder(monkeypatch)
    run = make_run(tmp_path / "run", tiny_model_dir, classifier_dir)
    result = runner.invoke(app, ["export", "-o", str(run), "--push-to-hub", "me/cai-demo",
                                 "--export.artifacts", "preferences", "--export.artifacts", "pm_model"])
    assert result.exit_code == 0, result.output
    assert [(r["repo_id"], r["repo_type"], r["private"], r["token"], r["exist_ok"]) for r in calls.repos] == [
        ("me/cai-demo-preferences", "dataset", True, SECRET, True),
        ("me/cai-demo-pm-model", "model", True, SECRET, True)]
    export = RunLayout(run).path("export")
    assert [(u["repo_id"], u["folder_path"], u["token"]) for u in calls.uploads] == [
        ("me/cai-demo-preferences", str(export / "preferences"), SECRET),
        ("me/cai-demo-pm-model", str(export / "pm_model"), SECRET)]
    assert "README.md" in calls.uploads[1]["files"] and "model.safetensors" in calls.uploads[1]["files"]
    assert "https://huggingface.co/me/cai-demo-pm-model" in result.output and SECRET not in result.output
    from huggingface_hub import ModelCard

    card = ModelCard.load(export / "pm_model" / "README.md")  # it names its repository and links its data
    assert "from_pretrained('me/cai-demo-pm-model')" in card.text and card.data.datasets == ["me/cai-demo-preferences"]
    _no_secret_under(run)  # cai.log, the cards, the config snapshot: nowhere


def test_a_stage_command_pushes_what_it_made_to_the_repository_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = _Recorder(monkeypatch)
    run = tmp_path / "run"
    _jsonl(RunLayout(run).labels_records, _label_rows(3))
    result = runner.invoke(app, ["export-preferences", "-o", str(run), "--push-to-hub", "me/prefs",
                                 "--no-hub.private"])
    assert result.exit_code == 0, result.output
    assert [(r["repo_id"], r["repo_type"], r["private"]) for r in calls.repos] == [("me/prefs", "dataset", False)]
    assert calls.uploads[0]["folder_path"] == str(RunLayout(run).path("export") / "preferences")
    assert "pushed it to https://huggingface.co/datasets/me/prefs (public)" in result.output
    _no_secret_under(run)


def test_a_push_that_would_fail_is_refused_before_the_stage_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run = tmp_path / "run"
    _jsonl(RunLayout(run).labels_records, _label_rows(3))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = runner.invoke(app, ["export-preferences", "-o", str(run), "--push-to-hub", "me/prefs"])
    assert result.exit_code == 2 and "HF_TOKEN is not set" in result.output
    result = runner.invoke(app, ["export-preferences", "-o", str(run), "--push-to-hub", "not a repo"])
    assert result.exit_code == 2 and "not a Hub repository id" in result.output
    assert not RunLayout(run).preferences.exists()  # the stage never ran


def test_offline_the_push_says_why_and_where_the_folder_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)  # HF_HUB_OFFLINE=1 is set by conftest
    folder = tmp_path / "sft_data"
    folder.mkdir()
    with pytest.raises(PushError, match=r"HF_HUB_OFFLINE is set; the folder is ready at .*`hf upload me/x "):
        push_folder(folder, "sft_data", "me/x", HubConfig())


def test_a_hub_refusal_is_one_line_with_the_token_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import HfApi

    _Recorder(monkeypatch)

    def refuse(api, **kwargs):
        raise RuntimeError(f"401 Unauthorized: token {kwargs['token']} cannot write\nmore lines")

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    with pytest.raises(PushError) as caught:
        push_folder(tmp_path, "pm_model", "me/pm", HubConfig())
    assert "401 Unauthorized: token *** cannot write; check that HF_TOKEN" in str(caught.value)
    assert SECRET not in str(caught.value) and "\n" not in str(caught.value)


def test_a_real_push(exported: Path):
    """Runs only with a network and a scratch repository named by CAI_TEST_HUB_REPO (and its token)."""
    import os

    reason = hub_offline_reason()
    if reason is not None:
        pytest.skip(f"a real push needs the Hub, which cannot be reached: {reason}")
    repo = os.environ.get("CAI_TEST_HUB_REPO")
    if not repo or not os.environ.get("HF_TOKEN"):
        pytest.skip("a real push needs CAI_TEST_HUB_REPO (a scratch dataset repo id) and HF_TOKEN")
    pushed = push_folder(exported / "sft_data", "sft_data", repo, HubConfig())
    assert repo in pushed.url
