import inspect
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import typer
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from constitutional_ai.cli import app, build_command, fields_for
from constitutional_ai.config import RunConfig
from constitutional_ai.data.store import read_records
from constitutional_ai.stages import registry

runner = CliRunner()


def _command(name):
    return next(c for c in app.registered_commands if c.name == name)


def _paths(config, prefix=""):
    """Every leaf field's dotted path, from the pydantic models themselves."""
    for name, value in config:
        if isinstance(value, BaseModel):
            yield from _paths(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_every_config_field_is_a_flag_named_by_its_dotted_path():
    config = RunConfig(feedback={"model": {}}, pm={"lora": {}}, sft={"lora": {}}, rl={"lora": {}}, dpo={"lora": {}})
    paths = set(_paths(config))
    assert {"critique.n_rounds", "feedback.model.device", "rl.kl_coef", "output_dir"} <= paths
    flags = {}
    for command in app.registered_commands:
        params = set(inspect.signature(command.callback).parameters) if command.callback else set()
        for param in params - {"config"}:
            flags.setdefault(param.replace("__", "."), command.name)
    assert paths <= set(flags), sorted(paths - set(flags))
    help_text = "".join(runner.invoke(app, [name, "--help"], terminal_width=80).output for name in set(flags.values()))
    for path in paths:
        assert f"--{path}" in help_text, path


def test_cai_run_offers_what_its_stages_read_less_what_it_wires_itself():
    run_params = {p.replace("__", ".") for p in inspect.signature(_command("run").callback).parameters}
    assert {"critique.n_rounds", "rl.kl_coef", "pm.sources", "eval.judge", "sft.num_train_epochs"} <= run_params
    assert "sft.model_name_or_path" not in run_params  # cai run fine-tunes the policy model
    assert not any(p.startswith(("dpo.", "serve_pm.", "eval_pm.")) for p in run_params)
    sft_params = set(inspect.signature(_command("sft").callback).parameters)
    assert "sft__model_name_or_path" in sft_params and not any(p.startswith("policy__") for p in sft_params)


@pytest.mark.parametrize("stage", registry.stages(), ids=lambda s: s.command)
def test_each_command_offers_exactly_its_sections_fields(stage):
    params = set(inspect.signature(_command(stage.command).callback).parameters) - {"config"}
    sections = set(stage.flag_sections)
    assert params and all(p.split("__")[0] in sections for p in params)
    assert {f.param for f in fields_for(stage.flag_sections)} == params


def test_flags_set_the_dotted_field_and_aliases_keep_the_short_names(tmp_path):
    seen = {}
    command = build_command(lambda config: seen.update(config=config), fields_for(set(RunConfig.model_fields)))
    probe = typer.Typer()
    probe.command()(command)
    result = runner.invoke(probe, ["--critique.n_rounds", "3", "--feedback.both_orders", "-o", str(tmp_path),
                                   "--pm-data", "a.jsonl,weight=0.5", "--policy", "some/dir", "--keep-dropout",
                                   "--feedback.clamp", "0.3", "0.7", "--policy.extra_body", '{"a": 1}'])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.critique.n_rounds == 3 and config.feedback.both_orders and config.output_dir == str(tmp_path)
    assert config.pm.sources[0].path == "a.jsonl" and config.pm.sources[0].weight == 0.5
    assert config.rl.policy == "some/dir" and config.pm.disable_dropout is False
    assert config.feedback.clamp == (0.3, 0.7) and config.policy.extra_body == {"a": 1}


def test_help_reads_at_80_columns():
    text = runner.invoke(app, ["label", "--help"], terminal_width=80).output
    assert "--feedback.both_orders, --both-orders / --no-feedback.both_orders," in text  # broken, never cut
    assert "<bool>" not in text.lower() and "boolean" not in text.lower()
    assert "Default: 0.4" not in text and "Default: [0.4, 0.6]" in text  # tuples show whole
    assert max(len(line) for line in text.splitlines()) <= 80


def test_cai_config_writes_commented_yaml_that_loads_back_to_the_same_config(tmp_path):
    result = runner.invoke(app, ["config", "-o", str(tmp_path / "c.yaml")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "c.yaml").read_text()
    assert "# Critique-revision rounds per prompt (paper: 4).\n  n_rounds: 4" in text
    assert RunConfig.from_yaml(tmp_path / "c.yaml") == RunConfig()
    changed = RunConfig(seed=7, critique={"n_rounds": 2}, feedback={"model": {"device": "cpu"}})
    (tmp_path / "d.yaml").write_text(changed.to_commented_yaml())
    assert RunConfig.from_yaml(tmp_path / "d.yaml") == changed


def test_flags_override_the_yaml_config(tmp_path, tiny_model_dir):
    config = RunConfig().with_overrides({"critique.n_rounds": 3, "prompts.limit": 2, "policy.model_name_or_path":
                                         str(tiny_model_dir), "critique.generation.max_new_tokens": 4})
    config.to_yaml(tmp_path / "c.yaml")
    out = tmp_path / "out"
    result = runner.invoke(app, ["critique", "-c", str(tmp_path / "c.yaml"), "--rounds", "1", "-o", str(out),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "critique" / "config.yaml").read_text())
    assert saved["critique"]["n_rounds"] == 1  # the flag wins
    assert saved["prompts"]["limit"] == 2  # the YAML is kept where no flag is given
    records = list(read_records(out / "critique" / "records.jsonl"))
    assert len(records) == 2 and all(len(r["rounds"]) == 1 for r in records)


def test_bad_input_is_one_line_without_traceback(tmp_path):
    (tmp_path / "c.yaml").write_text("critique:\n  n_rounds: many\n")
    result = runner.invoke(app, ["critique", "-c", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2
    assert "critique.n_rounds" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["critique", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no such directory" in result.output
    result = runner.invoke(app, ["constitution", "validate", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and "unknown field" in result.output
    result = runner.invoke(app, ["critique", "--device", "gpu0"])
    assert result.exit_code == 2 and "policy.device" in result.output


def test_an_unexpected_error_is_one_line_and_names_the_debug_switch(monkeypatch):
    from dataclasses import replace

    def boom(config, backend=None):
        raise RuntimeError("something deep inside a library\nwith a second line")

    monkeypatch.setitem(registry._REGISTRY, "critique", replace(registry.get("critique"), run=boom))
    monkeypatch.delenv("CAI_DEBUG", raising=False)
    result = runner.invoke(app, ["critique"])
    assert result.exit_code == 1
    assert "unexpected RuntimeError: something deep inside a library" in result.output
    assert "CAI_DEBUG=1" in result.output and "second line" not in result.output
    assert "Traceback" not in result.output


def test_constitution_commands():
    result = runner.invoke(app, ["constitution", "validate", "default"])
    assert result.exit_code == 0 and "16 critique/revision pairs, 16 comparison principles" in result.output
    from constitutional_ai.constitution import Constitution

    assert runner.invoke(app, ["constitution", "hash", "default"]).output.strip() == Constitution.default().hash


SMALL_RUN = ["--limit", "4", "--rounds", "1", "--max-new-tokens", "8", "--n-responses", "2",
             "--pairs-max-new-tokens", "8", "--sft-epochs", "1", "--epochs", "1", "--eval-fraction", "0.25",
             "--total-steps", "2", "--rollout-batch-size", "4", "--rl-max-new-tokens", "6", "--prompts-per-set", "3",
             "--eval-max-new-tokens", "6", "--bootstrap", "20", "--eval-limit", "4", "--no-progress"]


def test_run_makes_every_artifact_then_reruns_only_what_a_change_touches(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    args = ["run", "-m", str(tiny_model_dir), "-o", str(out), "--helpful-fraction", "0.25", *SMALL_RUN]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for artifact in ("critique/records.jsonl", "sft/train.jsonl", "sft/model/model.safetensors",
                     "pairs/records.jsonl", "labels/records.jsonl", "preferences/train.jsonl",
                     "pm/model/pm_info.json", "rl/model/model.safetensors", "rl/records.jsonl", "eval/elo.json",
                     "eval/elo.png", "eval/revisions.png", "report.html", "report.md", "config.yaml"):
        assert (out / artifact).is_file(), artifact
    assert len(list(read_records(out / "sft" / "train.jsonl"))) == 5  # 4 revisions + 1 helpful example
    state = json.loads((out / "pipeline.json").read_text())
    assert all(s["status"] == "complete" for s in state.values())
    # unchanged: nothing runs; a changed RL setting re-runs RL and what follows, nothing before
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.output.count("complete and unchanged, skipped") == 9
    changed = runner.invoke(app, [*args, "--kl-coef", "0.5"])
    assert changed.exit_code == 0, changed.output
    assert "critique: complete and unchanged, skipped" in changed.output
    assert "pm: complete and unchanged, skipped" in changed.output
    assert "rl: inputs changed, running again" in changed.output and "eval: inputs changed" in changed.output
    after = json.loads((out / "pipeline.json").read_text())
    assert after["pm"] == state["pm"] and after["rl"]["identity"] != state["rl"]["identity"]


def _cai(*args):
    return [sys.executable, "-m", "constitutional_ai.cli", *args]


def test_sigkill_mid_run_then_rerun_finishes_with_no_prompt_lost_or_duplicated(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt number {i} about topic {i * 7}"}) + "\n"
                               for i in range(40)))
    out = tmp_path / "run"
    args = _cai("critique", "-m", str(tiny_model_dir), "-p", str(prompts), "-o", str(out), "--rounds", "2",
                "--max-new-tokens", "24", "--batch-size", "2", "--temperature", "1.0", "--no-progress")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    records = out / "critique" / "records.jsonl"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if records.exists() and records.read_bytes().count(b"\n") >= 4:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = sum(1 for _ in read_records(records))
    assert 4 <= done_at_kill < 40, "the kill must land mid-run"
    manifest = json.loads((out / "critique" / "manifest.json").read_text())
    assert manifest["status"] == "running"
    finish = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr[-2000:]
    resumed = list(read_records(records))
    keys = [r["key"] for r in resumed]
    assert len(keys) == 40 and len(set(keys)) == 40
    # and the data is exactly what an uninterrupted run writes: principles and sampled text depend
    # on the seed and the prompt alone, not on where the kill fell or how batches were formed
    clean = tmp_path / "clean"
    result = runner.invoke(app, [a if a != str(out) else str(clean) for a in args[3:]] + ["--batch-size", "7"])
    assert result.exit_code == 0, result.output
    def by_key(rows):
        return {r["key"]: {k: v for k, v in r.items() if k != "timings"} for r in rows}

    assert by_key(resumed) == by_key(read_records(clean / "critique" / "records.jsonl"))
    manifest = json.loads((out / "critique" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"] == 1
    # a changed config on resume is refused with one clear line
    changed = subprocess.run([*args, "--rounds", "3"], env=env, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2
    assert "different config" in changed.stderr and "--overwrite" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_train_pm_then_eval_pm_from_the_command_line(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Help with task {i}?", "chosen": f"yes banana {i}", "rejected": f"yes {i}"} for i in range(48)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    trained = runner.invoke(app, ["train-pm", "-o", str(out), "--pm-model", str(tiny_model_dir), "--pm-data",
                                  f"{data},limit=40", "--pm-eval-data", f"{data},offset=40", "--max-length", "32",
                                  "--epochs", "2", "--lr", "3e-3", "--pm-device", "cpu", "--no-progress"])
    assert trained.exit_code == 0, trained.output
    assert json.loads((out / "pm" / "model" / "pm_info.json").read_text())["train_pairs"] == 40
    evaluated = runner.invoke(app, ["eval-pm", "-o", str(out), "--eval-data", f"{data},offset=40"])
    assert evaluated.exit_code == 0, evaluated.output
    results = json.loads((out / "pm" / "model" / "eval_results.json").read_text())
    assert results["pairs"] == 8 and 0.0 <= results["accuracy"] <= 1.0
    missing = runner.invoke(app, ["eval-pm", "-o", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "run `cai train-pm` first" in missing.output
    bad = runner.invoke(app, ["train-pm", "-o", str(out), "--pm-data", f"{data},weight"])
    assert bad.exit_code == 2 and "not key=value" in bad.output


def test_run_with_an_unreachable_hub_model_fails_at_once_before_any_stage(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "-m", str(tiny_model_dir), "-o", str(out), "--pm-model",
                                 "some-org/not-cached-pm", *SMALL_RUN])
    assert result.exit_code == 2 and "hf download some-org/not-cached-pm" in result.output
    assert not (out / "critique").exists()


#: What libraries print when left alone: tqdm bars, dataset maps, load reports, warnings, raw log dicts.
THIRD_PARTY_NOISE = ("it/s]", "examples/s]", "Loading weights", "Writing model shards", "LOAD REPORT",
                     "Warning", "warnings.warn", "Token indices sequence length", "{'loss'", "{'train_runtime'",
                     "pin_memory")


@pytest.mark.slow
def test_cai_run_on_the_embedded_default_is_quiet_and_ends_with_a_summary_matching_summary_json(tmp_path):
    from constitutional_ai.report.headline import format_headline

    out = tmp_path / "default"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "CAI_CACHE_DIR": str(tmp_path / "cache")}  # the demo build too
    done = subprocess.run(_cai("run", "-o", str(out)), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for artifact in ("critique/records.jsonl", "sft/model/model.safetensors", "labels/records.jsonl",
                     "eval_labeler/results.json", "pm/model/pm_info.json", "rl/model/model.safetensors",
                     "eval/elo.json", "eval/elo.png", "eval/revisions.png", "eval/rl_reward.png", "report.html",
                     "report.md", "summary.json", "cai.log"):
        assert (out / artifact).is_file(), artifact
    assert "These are toy models" in (out / "report.html").read_text()
    for noise in THIRD_PARTY_NOISE:
        assert noise not in done.stdout and noise not in done.stderr, noise
    log = (out / "cai.log").read_text()
    assert "LOAD REPORT" in log or "pin_memory" in log  # what the console was spared is kept, not lost

    summary = json.loads((out / "summary.json").read_text())
    assert "cai run finished in " in done.stdout and f"({summary['total_seconds']:.1f} s)" in done.stdout
    assert list(summary["stages"]) == ["critique", "export_sft", "sft", "pairs", "labels", "eval_labeler", "pm",
                                       "rl", "eval"]
    for name, stage in summary["stages"].items():
        assert stage["status"] == "complete" and not stage["skipped"], name
        assert f"{stage['seconds']:7.1f} s  {stage['produced']}" in done.stdout, name
    assert summary["stages"]["critique"]["produced"] == "52 prompts"
    assert summary["stages"]["rl"]["produced"] == "16 steps"
    head = summary["headline"]
    assert set(head) == {"elo", "pm", "labeler", "rl"} and head["labeler"]["n"] == 24
    assert head["labeler"]["position_bias"] is not None and head["rl"]["steps"] == 16
    assert set(head["elo"]["harmless"]) == {"initial", "sft", "rl"}
    lines = format_headline(head)
    assert len(lines) >= 4 and all(line in done.stdout for line in lines)
    assert f"report:  {out / 'report.html'}" in done.stdout

    again = subprocess.run(_cai("run", "-o", str(out)), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped (unchanged)") == 9 and all(line in again.stdout for line in lines)


def test_a_run_killed_mid_stage_completes_on_the_next_run_with_every_artifact(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    args = _cai("run", "-m", str(tiny_model_dir), "-o", str(out), *SMALL_RUN[:-1], "--total-steps", "40",
                "--no-progress")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rl_log = out / "rl" / "records.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it in the middle of PPO
        if rl_log.exists() and rl_log.read_bytes().count(b"\n") >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((out / "pipeline.json").read_text())
    assert state["rl"]["status"] == "running" and state["pm"]["status"] == "complete"
    finish = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert "pm: complete and unchanged, skipped" in finish.stdout + finish.stderr
    state = json.loads((out / "pipeline.json").read_text())
    assert all(s["status"] == "complete" for s in state.values())
    steps = [r["step"] for r in read_records(rl_log)]
    assert steps == list(range(1, 41))  # every PPO step logged exactly once across the kill
    assert (out / "rl" / "model" / "model.safetensors").is_file() and (out / "report.html").is_file()


def test_runtime_fields_are_marked_on_the_field_and_left_out_of_the_identity():
    base = RunConfig(feedback={"model": {"model_name_or_path": "judge"}})
    sections = ("seed", "policy", "feedback", "critique")
    same = base.with_overrides({"policy.device": "cpu", "policy.batch_size": 3, "critique.batch_size": 5,
                                "feedback.model.max_concurrency": 2})
    assert same.fingerprint(sections) == base.fingerprint(sections)
    for changed in ({"policy.model_name_or_path": "x"}, {"critique.n_rounds": 2}, {"feedback.model.revision": "v2"}):
        assert base.with_overrides(changed).fingerprint(sections) != base.fingerprint(sections), changed


def test_a_feedback_model_flag_starts_from_the_policy_not_the_demo_model():
    """feedback.model unset means "the policy": one of its flags must not swap the labeler for another model."""
    config = RunConfig().with_overrides({"feedback.model.batch_size": 8, "policy.model_name_or_path": "gpt2"})
    assert config.feedback.model.model_name_or_path == "gpt2" and config.feedback.model.batch_size == 8
    assert RunConfig().with_overrides({"pm.lora.r": 4}).pm.lora.r == 4  # other optional sections: their defaults


def test_the_embedded_default_config_file_is_what_cai_run_runs_with_no_arguments():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "embedded-default.yaml"
    assert RunConfig.from_yaml(path).model_dump() == RunConfig().model_dump()
