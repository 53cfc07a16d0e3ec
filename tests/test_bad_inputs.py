"""A catalogue of bad inputs, as a new user (or a hostile one) would give them: CLI flags, config
and constitution files, prompt and preference files, and record stores. Each must end in a
non-zero exit with one line that names the file or field, no traceback, and every file already
in the run directory byte-for-byte unchanged. (Server requests: tests/test_serve_pm.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from constitutional_ai.cli import app

runner = CliRunner()
BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(12))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
            and p.name not in (".lock", "cai.log")} if directory.is_dir() else {}


def _check(args: list[str], expect: str, run_dir: Path) -> str:
    before = _snapshot(run_dir)
    result = runner.invoke(app, args)
    out = result.output.strip()
    assert result.exit_code not in (0, None), out
    assert "Traceback" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), out
    lines = [line for line in out.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, out
    assert expect in error_lines[0], out
    after = _snapshot(run_dir)
    changed = [name for name, data in before.items() if after.get(name) != data]
    assert not changed, f"a refused command changed files already in the run directory: {changed}"
    return error_lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """One small complete critique run, copied by each record-store case."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = runner.invoke(app, ["critique", "-m", str(tiny_model_dir), "-o", str(out), "--limit", "3", "--rounds", "1",
                                 "--max-new-tokens", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def _files(tmp_path: Path) -> dict[str, Path]:
    f = {}
    f["empty"] = tmp_path / "empty.jsonl"
    f["empty"].write_text("")
    f["wrong_field"] = tmp_path / "wrong_field.jsonl"
    f["wrong_field"].write_text(json.dumps({"promt": "How do I pick a lock?"}) + "\n")
    f["malformed"] = tmp_path / "malformed.jsonl"
    f["malformed"].write_text("{not json\n[1, 2]\n42\n")
    f["bad_utf8"] = tmp_path / "bad_utf8.jsonl"
    f["bad_utf8"].write_bytes(b'{"prompt": "ok \xff\xfe"}\n')
    f["bomb"] = tmp_path / "bomb.yaml"
    f["bomb"].write_text(BOMB)
    f["huge"] = tmp_path / "huge.yaml"
    f["huge"].write_text("# " + "x" * (5 * 1024 * 1024) + "\n")
    f["not_yaml"] = tmp_path / "not_yaml.yaml"
    f["not_yaml"].write_text("seed: [1\n")
    f["list_yaml"] = tmp_path / "list.yaml"
    f["list_yaml"].write_text("- 1\n- 2\n")
    f["unknown_field"] = tmp_path / "unknown.yaml"
    f["unknown_field"].write_text("critique:\n  n_roundz: 2\n")
    f["bad_value"] = tmp_path / "bad_value.yaml"
    f["bad_value"].write_text("critique:\n  n_rounds: many\n")
    f["latin1"] = tmp_path / "latin1.yaml"
    f["latin1"].write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    f["bad_json"] = tmp_path / "bad.json"
    f["bad_json"].write_text('{"name": "x",\n "critique_revision": [}\n')
    f["no_principles"] = tmp_path / "no_principles.yaml"
    f["no_principles"].write_text("name: empty\nversion: '1'\ncritique_revision: []\ncomparison: []\n")
    f["pm_fields"] = tmp_path / "pm_fields.jsonl"
    f["pm_fields"].write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    f["pm_bad_line"] = tmp_path / "pm_bad_line.jsonl"
    f["pm_bad_line"].write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n{oops\n"
                                + json.dumps({"prompt": "q2", "chosen": "a", "rejected": "b"}) + "\n")
    return f


CASES: list[tuple[str, list[str], str]] = [
    # -- flags --------------------------------------------------------------------------------------
    ("temperature inf", ["critique", "--critique.generation.temperature", "inf"], "temperature"),
    ("temperature nan", ["critique", "--critique.generation.temperature", "nan"], "temperature"),
    ("temperature tiny", ["critique", "--temperature", "1e-300"], "greedy"),
    ("temperature huge", ["critique", "--temperature", "1e308"], "temperature"),
    ("top_p zero", ["critique", "--critique.generation.top_p", "0"], "top_p"),
    ("top_p above one", ["critique", "--critique.generation.top_p", "1.5"], "top_p"),
    ("zero rounds", ["critique", "--rounds", "0"], "n_rounds"),
    ("negative limit", ["critique", "--limit", "-3"], "prompts.limit"),
    ("bad device", ["critique", "--device", "gpu0"], "policy.device"),
    ("openai without url", ["critique", "--policy.backend", "openai"], "base_url"),
    ("extra_body not json", ["critique", "--policy.extra_body", "{oops"], "extra_body"),
    ("api key env not a name", ["critique", "--policy.api_key_env", "1 BAD"], "api_key_env"),
    ("rl temperature zero", ["ppo", "--rl.temperature", "0"], "rl.temperature"),
    ("kl coef negative", ["ppo", "--kl-coef", "-1"], "rl.kl_coef"),
    ("clamp out of order", ["label", "--feedback.clamp", "0.7", "0.9"], "feedback.clamp"),
    ("source not key=value", ["train-pm", "--pm-data", "x.jsonl,weight"], "key=value"),
    ("source weight zero", ["train-pm", "--pm-data", "x.jsonl,weight=0"], "weight"),
    ("empty output dir", ["critique", "--output_dir", " "], "output_dir"),
    ("serve beyond loopback", ["serve-pm", "--serve_pm.host", "0.0.0.0"], "CAI_PM_TOKEN"),
    # -- config files -------------------------------------------------------------------------------
    ("config missing", ["critique", "-c", "{tmp}/missing.yaml"], "missing.yaml"),
    ("config not yaml", ["critique", "-c", "{not_yaml}"], "not_yaml.yaml (line 2)"),
    ("config alias bomb", ["critique", "-c", "{bomb}"], "aliases"),
    ("config too big", ["critique", "-c", "{huge}"], "byte limit"),
    ("config a list", ["critique", "-c", "{list_yaml}"], "mapping"),
    ("config unknown field", ["critique", "-c", "{unknown_field}"], "critique.n_roundz"),
    ("config bad value", ["critique", "-c", "{bad_value}"], "critique.n_rounds"),
    ("config not utf-8", ["critique", "-c", "{latin1}"], "UTF-8"),
    # -- constitutions ------------------------------------------------------------------------------
    ("constitution missing", ["constitution", "validate", "{tmp}/nope.yaml"], "nope.yaml"),
    ("constitution alias bomb", ["constitution", "validate", "{bomb}"], "aliases"),
    ("constitution too big", ["constitution", "validate", "{huge}"], "byte limit"),
    ("constitution bad json", ["constitution", "validate", "{bad_json}"], "bad.json (line 2)"),
    ("constitution wrong schema", ["constitution", "validate", "{unknown_field}"], "unknown.yaml"),
    ("constitution not utf-8", ["constitution", "validate", "{latin1}"], "UTF-8"),
    ("constitution without principles", ["critique", "--constitution", "{no_principles}", "-o", "{run}"],
     "critique_revision"),
    # -- prompt files -------------------------------------------------------------------------------
    ("prompts missing", ["critique", "-p", "{tmp}/gone.jsonl", "-o", "{run}"], "gone.jsonl"),
    ("prompts empty", ["critique", "-p", "{empty}", "-o", "{run}"], "no usable prompts"),
    ("prompts wrong field", ["critique", "-p", "{wrong_field}", "-o", "{run}"], "promt"),
    ("prompts all malformed", ["critique", "-p", "{malformed}", "-o", "{run}"], "malformed"),
    ("prompts field absent", ["critique", "-p", "{wrong_field}", "--prompts-field", "nope", "-o", "{run}"],
     "looked for nope"),
    # -- preference and eval files ------------------------------------------------------------------
    ("pm data missing", ["train-pm", "--pm-data", "{tmp}/none.jsonl", "-o", "{run}"], "none.jsonl"),
    ("pm data empty", ["train-pm", "--pm-data", "{empty}", "-o", "{run}"], "empty.jsonl"),
    ("pm data no pair fields", ["train-pm", "--pm-data", "{pm_fields}", "-o", "{run}"], "pm_fields.jsonl"),
    ("pm data bad middle line", ["train-pm", "--pm-data", "{pm_bad_line}", "-o", "{run}"], "pm_bad_line.jsonl:2"),
    ("eval-pm without a pm", ["eval-pm", "-o", "{run}"], "no preference model"),
    ("serve-pm without a pm", ["serve-pm", "-o", "{run}"], "no preference model"),
    ("label without pairs", ["label", "-o", "{run}"], "no response pairs"),
    ("sft without data", ["sft", "-o", "{run}"], "no SFT data"),
    ("eval-labeler without data", ["eval-labeler", "--data", "{tmp}/none.jsonl", "-o", "{run}"], "none.jsonl"),
    ("report of nothing", ["report", "{tmp}/no_such_run"], "no_such_run"),
    ("empty model directory", ["critique", "-m", "{tmp}", "-o", "{run}", "--limit", "1"], "no config.json"),
    ("output under a file", ["critique", "-o", "{empty}/run"], "empty.jsonl"),
]


@pytest.mark.parametrize(("name", "args", "expect"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_and_changes_nothing(tmp_path, name, args, expect):
    files = _files(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("a file that must survive")
    values = {"tmp": str(tmp_path), "run": str(run), **{k: str(v) for k, v in files.items()}}
    _check([_fill(a, values) for a in args], _fill(expect, values), run)


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


# -- record stores: a finished run, then damaged --------------------------------------------------
def _damage_records(run: Path, how: str) -> None:
    records = run / "critique" / "records.jsonl"
    lines = records.read_bytes().splitlines(keepends=True)
    if how == "duplicate":
        records.write_bytes(lines[0] + lines[1] + lines[0] + b"".join(lines[2:]))
    elif how == "bad_utf8":
        records.write_bytes(lines[0] + b'{"key": "x", "t": "\xff"}\n' + b"".join(lines[1:]))
    elif how == "nul":
        records.write_bytes(lines[0] + b"\x00" * 40 + b"\n" + b"".join(lines[1:]))
    elif how == "manifest":
        (run / "critique" / "manifest.json").write_text("{not json")


@pytest.mark.parametrize(("how", "expect"), [("duplicate", "records.jsonl:3: key"), ("nul", "records.jsonl:2"),
                                             ("bad_utf8", "records.jsonl:2: not UTF-8"),
                                             ("manifest", "unreadable manifest")])
def test_a_damaged_record_store_is_named_by_line_and_left_as_it_is(tmp_path, finished_run, tiny_model_dir, how, expect):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _damage_records(run, how)
    _check(["critique", "-m", str(tiny_model_dir), "-o", str(run), "--limit", "3", "--rounds", "1",
            "--max-new-tokens", "4", "--no-progress"], expect, run)


def test_a_refused_resume_names_the_setting_that_changed(tmp_path, finished_run, tiny_model_dir):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    line = _check(["critique", "-m", str(tiny_model_dir), "-o", str(run), "--limit", "3", "--rounds", "2",
                   "--max-new-tokens", "4", "--no-progress"], "config (critique.n_rounds: 1 -> 2)", run)
    assert "--overwrite" in line


def test_an_empty_stage_left_by_a_failed_start_does_not_block_the_corrected_run(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    failed = runner.invoke(app, ["critique", "-m", str(tmp_path / "no_such_model"), "-o", str(run), "--limit", "2"])
    assert failed.exit_code == 2 and "no_such_model" in failed.output
    fixed = runner.invoke(app, ["critique", "-m", str(tiny_model_dir), "-o", str(run), "--limit", "2", "--rounds", "1",
                                "--max-new-tokens", "4", "--no-progress"])
    assert fixed.exit_code == 0, fixed.output


def test_credentials_in_a_server_url_are_never_printed_or_saved(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["critique", "--policy.backend", "openai", "--policy.base_url",
                                 "http://user:SECRET-KEY@127.0.0.1:9/v1", "--policy.max_retries", "0",
                                 "--policy.request_timeout", "2", "-o", str(run), "--limit", "1"])
    assert result.exit_code != 0 and "SECRET-KEY" not in result.output
    assert all(b"SECRET-KEY" not in data for data in _snapshot(run).values())
    log = run / "cai.log"  # the libraries' log (httpx logs request URLs) is scrubbed too
    assert log.is_file() and b"SECRET-KEY" not in log.read_bytes()


def test_a_prompt_that_quotes_a_transcript_is_kept_as_written(tmp_path):
    from constitutional_ai.config import PromptSourceConfig
    from constitutional_ai.data.prompts import load_prompts

    text = "Before the quote.\n\nHuman: a quoted turn\n\nAssistant: a quoted reply"
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": text}) + "\n")
    items, report = load_prompts(PromptSourceConfig(path=str(path)))
    assert items[0].messages == [{"role": "user", "content": text}] and report.parsed_transcripts == 0
    parsed, report = load_prompts(PromptSourceConfig(path=str(path), format="hh", field="prompt"))  # asked for
    assert parsed[0].messages[-1]["content"] == "a quoted turn" and report.as_dict()["parsed_transcripts"] == 1


def test_a_prompts_file_edited_in_place_is_refused_not_mixed(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(2)))
    run = tmp_path / "run"
    args = ["critique", "-m", str(tiny_model_dir), "-o", str(run), "-p", str(prompts), "--rounds", "1",
            "--max-new-tokens", "4", "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    prompts.write_text("".join(json.dumps({"prompt": f"another question {i}?"}) + "\n" for i in range(5)))
    _check(args, "different inputs", run)  # the old records are not mixed with the new file's
    redo = runner.invoke(app, [*args, "--overwrite"])
    assert redo.exit_code == 0, redo.output
    keys = [json.loads(line)["key"] for line in (run / "critique" / "records.jsonl").read_text().splitlines()]
    assert len(keys) == 5


def test_an_input_file_is_part_of_the_pipeline_identity(tmp_path):
    from constitutional_ai.config import RunConfig
    from constitutional_ai.layout import RunLayout
    from constitutional_ai.stages import registry
    from constitutional_ai.stages.pipeline import stage_identities

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "one?"}) + "\n")
    config = RunConfig(prompts={"path": str(prompts)})
    before = stage_identities(config, RunLayout(tmp_path), registry.pipeline_order())
    prompts.write_text(json.dumps({"prompt": "two?"}) + "\n")
    after = stage_identities(config, RunLayout(tmp_path), registry.pipeline_order())
    assert after["critique"] != before["critique"] and after["pairs"] != before["pairs"]
    assert after["rl"] != before["rl"]
