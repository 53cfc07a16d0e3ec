"""A stage needs one place: declared from this file alone, `cai run` orders, hashes, runs, skips and
re-runs it, `cai report` shows it, and it is a `cai` command with its sections' flags."""

from __future__ import annotations

import inspect
import json

import pytest
from typer.testing import CliRunner

from constitutional_ai import cli
from constitutional_ai.config import RunConfig
from constitutional_ai.data.store import RecordStore, read_records
from constitutional_ai.layout import RunLayout
from constitutional_ai.report.spec import Plot, ReportSpec
from constitutional_ai.stages import registry
from constitutional_ai.stages.registry import Stage

runner = CliRunner()


@pytest.fixture
def toy_stages(monkeypatch):
    """Two toy stages, registered in the wrong order on purpose, replacing the built-in ones."""
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_BUILTIN_LOADED", True)
    monkeypatch.setattr(RunLayout, "ENTRIES", dict(RunLayout.ENTRIES))
    RunLayout.add_entry("toy_numbers", "toy/numbers", "the toy source's record store")
    RunLayout.add_entry("toy_sum", "toy/sum.json", "the toy sum")
    calls = []

    def numbers(config: RunConfig) -> None:
        calls.append(("numbers", config.seed))
        layout = RunLayout(config.output_dir)
        identity = {"stage": "toy_numbers", "config": config.fingerprint(("seed",))}
        with RecordStore(layout.toy_numbers, identity, resume=config.resume, overwrite=config.overwrite) as store:
            store.write([{"key": str(i), "value": config.seed * i} for i in range(5)])
            store.close(complete=True)

    def total(config: RunConfig) -> None:
        calls.append(("sum", config.seed))
        layout = RunLayout(config.output_dir)
        values = [r["value"] for r in read_records(layout.toy_numbers / "records.jsonl")]
        layout.toy_sum.write_text(json.dumps({"sum": sum(values)}))

    registry.register(Stage(name="toy_sum", command="toy-sum", run=total, sections=("critique",),
                            help="Sum the toy numbers.", consumes=("toy_numbers",), produces=("toy_sum",)))
    registry.register(Stage(name="toy_numbers", command="toy-numbers", run=numbers, sections=("seed",),
                            help="Write five toy numbers.", produces=("toy_numbers",),
                            report=ReportSpec(store="toy_numbers", unit="numbers",
                                              plots=(Plot("toy_sum", "not a picture"),))))
    yield calls
    for name in ("toy_numbers", "toy_sum"):
        if hasattr(RunLayout, name):
            delattr(RunLayout, name)
    app_commands = cli.app.registered_commands
    app_commands[:] = [c for c in app_commands if c.name not in ("toy-sum", "toy-numbers")]


def test_a_stage_declared_in_one_place_is_ordered_run_hashed_skipped_and_reported(tmp_path, toy_stages):
    out = tmp_path / "run"
    assert [s.name for s in registry.pipeline_order()] == ["toy_numbers", "toy_sum"]  # from consumes/produces
    first = runner.invoke(cli.app, ["run", "-o", str(out), "--seed", "2", "--no-progress"])
    assert first.exit_code == 0, first.output
    assert toy_stages == [("numbers", 2), ("sum", 2)]
    assert json.loads((out / "toy" / "sum.json").read_text()) == {"sum": 20}
    state = json.loads((out / "pipeline.json").read_text())
    assert set(state) == {"toy_numbers", "toy_sum"} and all(s["status"] == "complete" for s in state.values())
    report = (out / "report.html").read_text()
    assert "toy_numbers" in report and "numbers" in report

    again = runner.invoke(cli.app, ["run", "-o", str(out), "--seed", "2", "--no-progress"])
    assert again.exit_code == 0, again.output
    assert toy_stages == [("numbers", 2), ("sum", 2)]  # both complete and unchanged: skipped
    assert "toy_numbers: complete and unchanged, skipped" in again.output

    # a change to the sum's own section re-runs the sum only; a seed change re-runs both
    runner.invoke(cli.app, ["run", "-o", str(out), "--seed", "2", "--critique.n_rounds", "2", "--no-progress"])
    assert toy_stages[2:] == [("sum", 2)]
    runner.invoke(cli.app, ["run", "-o", str(out), "--seed", "3", "--critique.n_rounds", "2", "--no-progress"])
    assert toy_stages[3:] == [("numbers", 3), ("sum", 3)]
    assert json.loads((out / "toy" / "sum.json").read_text()) == {"sum": 30}
    after = json.loads((out / "pipeline.json").read_text())
    assert after["toy_sum"]["identity"] != state["toy_sum"]["identity"]


def test_a_registered_stage_is_a_command_with_its_sections_flags(tmp_path, toy_stages):
    cli.register_commands()
    command = next(c for c in cli.app.registered_commands if c.name == "toy-sum")
    params = set(inspect.signature(command.callback).parameters)
    assert "critique__n_rounds" in params and "rl__kl_coef" not in params
    (tmp_path / "toy" / "numbers").mkdir(parents=True)
    (tmp_path / "toy" / "numbers" / "records.jsonl").write_text('{"key": "a", "value": 4}\n')
    result = runner.invoke(cli.app, ["toy-sum", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "toy" / "sum.json").read_text()) == {"sum": 4}


def test_declaration_errors_are_caught():
    with pytest.raises(ValueError, match="not a RunLayout entry"):
        Stage(name="x", command="x", run=print, sections=(), help="", produces=("no_such_entry",))
    a = Stage(name="a", command="a", run=print, sections=(), help="", consumes=("pm_model",), produces=("sft_model",))
    b = Stage(name="b", command="b", run=print, sections=(), help="", consumes=("sft_model",), produces=("pm_model",))
    with pytest.raises(ValueError, match="cycle"):
        registry.pipeline_order([a, b])
    assert registry.get("critique").command == "critique"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("critique"))


def test_every_builtin_stage_declares_real_sections_and_layout_entries():
    fields = set(RunConfig.model_fields)
    for stage in registry.stages():
        assert set(stage.sections) | set(stage.options) <= fields, stage.name
        if stage.report is not None:
            assert stage.report.store in RunLayout.ENTRIES
            assert all(p.entry in RunLayout.ENTRIES for p in stage.report.plots)
    names = [s.name for s in registry.pipeline_order()]
    assert names == ["critique", "export_sft", "sft", "pairs", "labels", "eval_labeler", "pm", "rl", "eval"]


def _old_identities(config: RunConfig) -> dict[str, str]:
    """How 0.1.0's pipeline (a hand-kept table) hashed each stage: runs it made must stay valid."""
    import hashlib

    table = [("critique", ("seed", "constitution", "policy", "prompts", "critique"), ()),
             ("export_sft", ("seed", "sft_export"), ("critique",)), ("sft", ("seed", "policy", "sft"), ("export_sft",)),
             ("pairs", ("seed", "prompts", "pairs"), ("sft",)), ("labels", ("seed", "constitution", "feedback"),
                                                                  ("pairs",)),
             ("pm", ("seed", "pm"), ("labels",)), ("rl", ("seed", "prompts", "rl"), ("sft", "pm")),
             ("eval", ("seed", "eval"), ("sft", "rl", "pm"))]
    base = config.with_overrides({"sft.model_name_or_path": config.policy.model_name_or_path})
    out: dict[str, str] = {}
    for name, sections, after in table:
        blob = json.dumps([name, base.fingerprint(sections), [out[a] for a in after]])
        out[name] = "sha256:" + hashlib.sha256(blob.encode()).hexdigest()
    return out


@pytest.mark.parametrize("overrides", [{}, {"policy.model_name_or_path": "gpt2", "rl.kl_coef": 0.1},
                                       {"sft.model_name_or_path": "ignored/by/cai-run", "pairs.n_responses": 3}])
def test_pipeline_identities_are_those_of_runs_made_before_the_registry(tmp_path, overrides):
    from constitutional_ai.stages.pipeline import stage_identities

    config = RunConfig().with_overrides(overrides) if overrides else RunConfig()
    (tmp_path / "sft" / "model").mkdir(parents=True)  # pairs/labels wiring sees an SFT model: no effect on identity
    identities = stage_identities(config, RunLayout(tmp_path), registry.pipeline_order())
    new = identities.pop("eval_labeler")  # joined the pipeline later: its own, and no other stage's changes
    assert new.startswith("sha256:") and identities == _old_identities(config)
