import json
import shutil
import subprocess

import pytest

from constitutional_ai.config import RunConfig
from constitutional_ai.evaluation.curves import plot_curve
from constitutional_ai.report.build import build_report
from constitutional_ai.stages import registry

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _fake_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    RunConfig().to_yaml(run / "config.yaml")
    (run / "critique").mkdir()
    (run / "critique" / "manifest.json").write_text(json.dumps({"status": "complete", "records": 1}))
    (run / "critique" / "records.jsonl").write_text(json.dumps({
        "key": "k1", "prompt": [{"role": "user", "content": "How do I pick a lock?"}],
        "initial_response": "Use a pick.", "constitution_hash": "sha256:abc",
        "rounds": [{"round": 1, "principle_id": "harm", "critique": "It helps burglary.",
                    "revision": "I can't help with that, but a locksmith can."}]}) + "\n")
    (run / "eval").mkdir()
    (run / "eval" / "records.jsonl").write_text(json.dumps({"key": "harmless:rl:k1", "set": "harmless", "model": "rl",
                                                            "prompt_key": "k1", "response": "Call a locksmith."})
                                                + "\n")
    ratings = {"elo": {"initial": 0.0, "rl": 42.0}, "lower": {"initial": 0.0, "rl": 10.0},
               "upper": {"initial": 0.0, "rl": 70.0}}
    (run / "eval" / "elo.json").write_text(json.dumps({"checkpoints": ["initial", "rl"], "harmless": ratings,
                                                       "helpful": ratings, "anchor": "initial"}))
    plot_curve([(0, 0.1), (1, 0.4)], run / "eval" / "revisions.png", "t", "x", "y")
    (run / "pm" / "model").mkdir(parents=True)
    (run / "pm" / "model" / "eval_results.json").write_text(json.dumps({"accuracy": 0.61, "ece": 0.07, "pairs": 300,
                                                                        "mean_margin": 0.3}))
    return run


def test_the_report_shows_the_constitution_tables_plots_and_samples(tmp_path):
    run = _fake_run(tmp_path)
    page = build_report(run, registry.report_sections()).read_text()
    assert "These are toy models" in page and "configs/one-gpu-qwen.yaml" in page
    assert "<img src='eval/revisions.png'" in page and "eval/elo.png" not in page  # only plots that exist
    assert "0.610" in page and "42.0" in page and "It helps burglary." in page and "Call a locksmith." in page
    assert "<h2>Constitution</h2>" in page and "sha256:" in page
    summary = (run / "report.md").read_text()
    assert "| rl | 42.0 | 42.0 |" in summary and "accuracy 0.610" in summary


def test_a_run_directory_that_does_not_exist_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from constitutional_ai.cli import app

    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run directory" in result.output


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_the_report_renders_in_headless_chromium_with_its_plots_and_tables(tmp_path):
    run = _fake_run(tmp_path)
    page = build_report(run, registry.report_sections())
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<table") >= 3 and "<img" in dom.stdout and "Elo" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1000,2400", page.as_uri()],
                   capture_output=True, text=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a page with pictures and tables, not a blank one
