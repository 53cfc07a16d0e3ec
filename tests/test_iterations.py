"""Iterated online RL-CAI (``rl.iterations``): the RL loop's stages repeated per iteration, each
hashed, skipped and resumed on its own; the PM's data and held-out sets across iterations; the
layout's per-iteration entries; and a killed iteration-2 run that resumes without redoing iteration 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from constitutional_ai.config import PreferenceSourceConfig, RunConfig
from constitutional_ai.layout import RunLayout
from constitutional_ai.preference_model.data import iteration_mix
from constitutional_ai.stages import registry
from constitutional_ai.stages.pipeline import stage_identities

LOOP = ("pairs", "labels", "pm", "rl")


def test_the_rl_loop_is_repeated_per_iteration_reading_the_iteration_before():
    order = registry.run_order(RunConfig().with_overrides({"rl.iterations": 3}))
    names = [s.name for s in order]
    for k in (2, 3):
        assert [n for n in names if n.endswith(f"@{k}")] == [f"{s}@{k}" for s in LOOP]
    assert names.index("rl") < names.index("pairs@2") < names.index("rl@2") < names.index("pairs@3")
    assert names[-1] == "eval" or names.index("eval") > names.index("rl@3")
    by = {s.name: s for s in order}
    assert set(by["pairs@2"].consumes) == {"sft_model", "rl_model"}  # iteration 1's policy samples iteration 2
    assert set(by["pairs@3"].consumes) == {"sft_model", "rl_model@2"}
    assert set(by["pm@3"].consumes) == {"preferences@3", "pm_model@2"}  # continues the PM before it
    assert set(by["rl@3"].consumes) == {"sft_model", "pm_model@3", "rl_model@2"}
    assert "rl_model@3" in by["eval"].consumes and "pm_model@3" in by["eval"].consumes  # judged by the last PM
    one = [s.name for s in registry.run_order(RunConfig())]
    assert one == [s.name for s in registry.pipeline_order()]  # one iteration: the pipeline as it was


def test_raising_iterations_extends_a_run_without_changing_what_it_already_made(tmp_path):
    layout = RunLayout(tmp_path)
    one = stage_identities(RunConfig(), layout, registry.run_order(RunConfig()))
    config = RunConfig().with_overrides({"rl.iterations": 3})
    three = stage_identities(config, layout, registry.run_order(config))
    assert {k: v for k, v in three.items() if "@" not in k and k != "eval"} == \
        {k: v for k, v in one.items() if k != "eval"}
    assert three["eval"] != one["eval"]  # it now compares every iteration's policy
    weighted = RunConfig().with_overrides({"rl.iterations": 3, "pm.new_data_weight": 4.0})
    changed = stage_identities(weighted, layout, registry.run_order(weighted))
    assert changed["pm@2"] != three["pm@2"] and changed["rl@3"] != three["rl@3"]
    assert changed["pm"] == three["pm"]  # iteration 1 does not read the weight
    assert changed["pairs"] == three["pairs"] and changed["labels"] == three["labels"]


def test_direct_rlaif_runs_no_pm_loop_and_its_eval_is_judged_by_the_feedback_model(tmp_path):
    config = RunConfig().with_overrides({"rl.reward": "feedback"})
    order = registry.run_order(config)
    assert not {"pairs", "labels", "pm"} & {s.name for s in order}
    eval_stage = next(s for s in order if s.name == "eval")
    assert eval_stage.wire(config, RunLayout(tmp_path)).eval.judge == "feedback"
    rl = next(s for s in order if s.name == "rl")
    configs = [RunConfig().with_overrides(c) for c in ({"rl.reward": "feedback"},
                                                        {"rl.reward": "feedback", "feedback.principles": "all"})]
    ids = {stage_identities(c, RunLayout(tmp_path), registry.run_order(c))["rl"] for c in configs}
    assert len(ids) == 2  # the feedback settings decide the reward, so the RL stage's identity
    assert rl.extra_identity is not None and rl.extra_identity(RunConfig()) == {}  # ... but not the PM's


def test_the_layout_keeps_iteration_one_where_it_was_and_later_ones_under_iterations(tmp_path):
    layout = RunLayout(tmp_path)
    assert layout.pm_model == tmp_path / "pm" / "model" and layout.sft_model == tmp_path / "sft" / "model"
    two = layout.at(2)
    assert two.pm_model == tmp_path / "iterations" / "2" / "pm" / "model"
    assert two.sft_model == layout.sft_model  # not part of the loop: one per run
    assert layout.path("pm_model@2") == two.pm_model and layout.path("pm_model@1") == layout.pm_model
    assert layout.run_data("run:preferences@2") == two.preferences and layout.run_model("run:rl@2") == two.rl_model
    assert layout.run_data("run:sft@2") is None  # not a per-iteration entry
    with pytest.raises(KeyError, match="per-iteration"):
        layout.path("sft_model@2")
    assert layout.iterations() == [1]
    (tmp_path / "iterations" / "3").mkdir(parents=True)
    (tmp_path / "iterations" / "2").mkdir()
    assert layout.iterations() == [1, 2, 3]
    assert RunLayout.of(RunConfig().with_overrides({"output_dir": str(tmp_path), "iteration": 2})).rl == two.rl


def _preferences(path: Path, prompts: int, tag: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}],
             "chosen": [{"role": "assistant", "content": f"{tag} good {i}"}],
             "rejected": [{"role": "assistant", "content": f"{tag} bad {i}"}], "p_chosen": 0.8} for i in range(prompts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_each_iteration_adds_its_labels_weighted_and_keeps_the_held_out_prompts_out(tmp_path):
    layout = RunLayout(tmp_path)
    for k, tag in ((1, "first"), (2, "second"), (3, "third")):
        _preferences(layout.at(k).preferences, 40, tag)
    sources = [PreferenceSourceConfig(path="run:preferences")]
    one = iteration_mix(sources, [], 0.25, 0, tmp_path, 1, 2.0)
    three = iteration_mix(sources, [], 0.25, 0, tmp_path, 3, 2.0)
    assert [p.key for p in three.heldout] == [p.key for p in one.heldout]  # fixed across iterations
    held = {p.prompt[0]["content"] for p in one.heldout}
    assert len(held) == 10
    assert {p.prompt[0]["content"] for p in three.newest} == held
    assert all(p.chosen.startswith("third") for p in three.newest)  # the newest policy's pairs
    assert not held & {p.prompt[0]["content"] for p in three.train}  # never trained on
    tags = [p.chosen.split()[0] for p in three.train]
    assert tags.count("first") == 30 and tags.count("second") == 30 and tags.count("third") == 60  # newest x2
    assert one.newest == one.heldout and len(one.train) == 30
    with pytest.raises(Exception, match="no AI preference labels"):
        iteration_mix(sources, [], 0.25, 0, tmp_path, 4, 2.0)


def _cai(*args: str) -> list[str]:
    return [sys.executable, "-m", "constitutional_ai", *args]


def _state(out: Path) -> dict:
    try:
        return json.loads((out / "pipeline.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
def test_an_embedded_run_with_two_iterations_reports_both_and_resumes_a_kill_in_iteration_two(tmp_path):
    out = tmp_path / "run"
    small = ["--limit", "16", "--rounds", "1", "--total-steps", "4", "--prompts-per-set", "6", "-o", str(out),
             "--iterations", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen(_cai("run", *small), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None:
        if _state(out).get("pm@2", {}).get("status") == "running":
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()[-3000:] if process.stderr else ""
    os.killpg(process.pid, signal.SIGKILL)  # a kill in the middle of iteration 2
    process.wait()
    first = _state(out)
    assert all(first[s]["status"] == "complete" for s in LOOP) and first["pm@2"]["status"] == "running"
    made = (out / "rl" / "model" / "model.safetensors").stat().st_mtime_ns

    done = subprocess.run(_cai("run", *small), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    for name in ("critique", "export_sft", "sft", *LOOP, "pairs@2", "labels@2"):
        assert stages[name]["skipped"], name  # iteration 1 (and what iteration 2 had finished) is not redone
    for name in ("pm@2", "rl@2", "eval"):
        assert not stages[name]["skipped"] and stages[name]["status"] == "complete", name
    assert (out / "rl" / "model" / "model.safetensors").stat().st_mtime_ns == made
    assert (out / "iterations" / "2" / "rl" / "model" / "model.safetensors").is_file()

    head = summary["headline"]
    assert [it["iteration"] for it in head["iterations"]] == [1, 2]
    two = head["iterations"][1]
    assert two["pm_heldout"]["n"] == head["iterations"][0]["pm_heldout"]["n"]  # the same fixed held-out set
    assert two["pm_newest"]["n"] >= 1 and "previous_pm_newest" in two and two["rl"]["steps"] == 4
    assert set(head["elo"]["harmless"]) == {"initial", "sft", "rl@1", "rl@2"}
    assert "harmless" in two["elo"]
    report = (out / "report.html").read_text()
    assert "<h2>Iterations</h2>" in report and "pm@2" in report and "rl@2" in report
    assert "iteration 2: PM" in done.stdout
    pm_info = json.loads((out / "iterations" / "2" / "pm" / "model" / "pm_info.json").read_text())
    assert pm_info["base_model"] == "run:pm@1"  # continued from iteration 1's PM, named within the run

    again = subprocess.run(_cai("run", *small), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(s["skipped"] for s in json.loads((out / "summary.json").read_text())["stages"].values())


def test_an_iterations_identity_does_not_depend_on_what_exists_yet_or_on_rl_policy(tmp_path):
    """Iteration 2 names what it continues by run: name, so its identity taken before iteration 1 has
    made its models is the one taken after (a rerun skips it), and it always continues iteration 1."""
    config = RunConfig().with_overrides({"rl.iterations": 2, "output_dir": str(tmp_path)})
    layout = RunLayout(tmp_path)
    before = stage_identities(config, layout, registry.run_order(config))
    for path in (layout.pm_model, layout.rl_model, layout.sft_model):
        path.mkdir(parents=True)
    assert stage_identities(config, layout, registry.run_order(config)) == before
    by = {s.name: s for s in registry.run_order(config)}
    explicit = config.with_overrides({"rl.policy": "some/start"})
    assert by["rl"].wire(explicit, layout).rl.policy == "some/start"  # where iteration 1 starts
    assert by["rl@2"].wire(explicit, layout).rl.policy == "run:rl@1"  # iteration 2 continues it regardless
    assert by["pm@2"].wire(config, layout).pm.model_name_or_path == "run:pm@1"
    assert layout.at(2).resolve_model("run:pm@1") == str(layout.pm_model)
    with pytest.raises(Exception, match="does not exist yet"):
        layout.resolve_model("run:rl@2")


def test_a_loop_command_run_by_hand_at_an_iteration_is_wired_as_cai_run_wires_it(tmp_path, monkeypatch):
    from dataclasses import replace

    from typer.testing import CliRunner

    from constitutional_ai.cli import app

    seen = {}
    original = registry.get("rl")
    registry.register(replace(original, run=lambda config: seen.update(config=config)), replace=True)
    try:
        result = CliRunner().invoke(app, ["ppo", "--iteration", "3", "-o", str(tmp_path)])
    finally:
        registry.register(original, replace=True)
    assert result.exit_code == 0, result.output
    assert seen["config"].iteration == 3 and seen["config"].rl.policy == "run:rl@2"
    assert RunLayout.of(seen["config"]).rl == tmp_path / "iterations" / "3" / "rl"


def test_nothing_held_out_means_no_newest_set_and_nothing_withheld(tmp_path):
    layout = RunLayout(tmp_path)
    for k in (1, 2):
        _preferences(layout.at(k).preferences, 20, f"it{k}")
    mix = iteration_mix([PreferenceSourceConfig(path="run:preferences")], [], 0.0, 0, tmp_path, 2, 2.0)
    assert not mix.heldout and not mix.newest and len(mix.train) == 20 + 40


def test_folders_of_iterations_beyond_the_runs_last_setting_are_not_part_of_it(tmp_path):
    layout = RunLayout(tmp_path)
    for k in (2, 3):
        (tmp_path / "iterations" / str(k)).mkdir(parents=True)
    assert layout.iterations() == [1, 2, 3]
    RunConfig().with_overrides({"rl.iterations": 2}).to_yaml(layout.config)
    assert layout.iterations() == [1, 2]
