import html
import math

import pytest
from typer.testing import CliRunner

from constitutional_ai.cli import app
from constitutional_ai.common.errors import ConfigError
from constitutional_ai.constitution import Constitution
from constitutional_ai.evaluation.calibration import wilson_interval
from constitutional_ai.report.compare import compare_runs
from constitutional_ai.report.diff import metric_deltas, principle_diff
from constitutional_ai.report.headline import headline
from constitutional_ai.stages import registry
from test_report import make_run, needs_chromium, render_alone


def _edited_constitution() -> Constitution:
    """The default with 'privacy' removed, 'brevity' added, 'violence' and 'courteous-tone' reworded."""
    data = Constitution.default().model_dump(mode="json")
    data["critique_revision"] = [p for p in data["critique_revision"] if p["id"] != "privacy"]
    data["critique_revision"].append({"id": "brevity", "critique_request": "Is the response padded?",
                                      "revision_request": "Cut it to what matters."})
    violence = next(p for p in data["critique_revision"] if p["id"] == "violence")
    violence["critique_request"] = "Does the response glorify violence in any way?"
    courteous = next(p for p in data["comparison"] if p["id"] == "courteous-tone")
    courteous["text"] = "Which response is kinder?"
    return Constitution.from_dict(data, "test")


@pytest.fixture
def runs(tmp_path):
    a = make_run(tmp_path, "a")
    b = make_run(tmp_path, "b", constitution=_edited_constitution(), overrides={"critique.n_rounds": 2},
                 answer="Ask the police.", revision="Please ask a professional.", rl_elo=60.0, pm=(0.8, 50),
                 labeler=(0.7, 40), rewards=[0.0, 0.5, 0.9])
    return a, b


def test_principles_are_diffed_by_id():
    d = principle_diff(Constitution.default(), _edited_constitution(), "critique_revision")
    assert d.added == ["brevity"] and d.removed == ["privacy"] and list(d.changed) == ["violence"]
    assert set(d.changed["violence"]) == {"critique_request"}
    assert d.changed["violence"]["critique_request"][1] == "Does the response glorify violence in any way?"
    c = principle_diff(Constitution.default(), _edited_constitution(), "comparison")
    assert (c.added, c.removed, list(c.changed)) == ([], [], ["courteous-tone"])


def test_metric_deltas_are_b_minus_a_with_both_runs_uncertainty(runs):
    a, b = runs
    deltas = {d.metric: d for d in metric_deltas(headline(a), headline(b))}
    assert set(deltas) == {"Elo (harmless) rl", "Elo (helpful) rl", "PM accuracy", "labeler accuracy",
                           "RL reward at the end", "RL KL at the end"}  # not the anchors, 0 in both by definition
    elo = deltas["Elo (harmless) rl"]
    assert (elo.a, elo.b, elo.delta) == (42.0, 60.0, 18.0)
    assert elo.delta_interval == (pytest.approx(18 - math.hypot(32, 28)), pytest.approx(18 + math.hypot(28, 32)))
    pm = deltas["PM accuracy"]
    assert pm.delta == pytest.approx(0.4) and (pm.a_n, pm.b_n) == ("5 pairs", "50 pairs")
    (la, ua), (lb, ub) = wilson_interval(0.4, 5), wilson_interval(0.8, 50)
    assert pm.delta_interval == (pytest.approx(0.4 - math.hypot(0.8 - lb, ua - 0.4)),
                                 pytest.approx(0.4 + math.hypot(ub - 0.8, 0.4 - la)))
    assert deltas["labeler accuracy"].delta == pytest.approx(0.15)
    rl = deltas["RL reward at the end"]
    assert (rl.a, rl.b, rl.delta_interval) == (pytest.approx(0.32), 0.9, None)


def test_the_comparison_page_shows_constitution_config_metrics_and_answers(runs):
    a, b = runs
    out = compare_runs(a, b, registry.report_sections())
    assert out == a / "compare.html"
    page = html.unescape(out.read_text())
    assert Constitution.default().hash in page and _edited_constitution().hash in page
    assert ("<td>brevity</td><td>added in B</td><td></td><td>critique_request: Is the response padded?\n"
            "revision_request: Cut it to what matters.</td>") in page
    assert "<td>privacy</td><td>removed in B</td><td>critique_request: " in page
    assert ("<td>violence</td><td>changed: critique_request</td><td>"
            f"{Constitution.default().critique_principle('violence').critique_request}</td>"
            "<td>Does the response glorify violence in any way?</td>") in page
    assert "<td>courteous-tone</td><td>changed: text</td>" in page and "Which response is kinder?" in page
    assert "<td>critique.n_rounds</td><td>4</td><td>2</td>" in page
    assert "<td>seed</td>" not in page  # only keys that differ
    assert ("<td>Elo (harmless) rl</td><td>42.0 [10.0, 70.0] on 16 prompts</td>"
            "<td>60.0 [28.0, 88.0] on 16 prompts</td><td>+18.0 [-24.5, 60.5]</td>") in page
    assert "<td>PM accuracy</td><td>0.400 [0.12, 0.77] on 5 pairs</td><td>0.800 [0.67, 0.89] on 50 pairs</td>" \
           "<td>+0.400" in page
    assert "<td>RL reward at the end</td><td>0.320 on 12 steps</td><td>0.900 on 3 steps</td><td>+0.580</td>" in page
    assert "<p><b>harmless prompt:</b> How do I pick a lock?</p>" in page
    assert "<td>rl</td><td>Call a locksmith. (rl)</td><td>Ask the police. (rl)</td>" in page
    assert ("<td>SL-CAI final revision</td><td>I can't help with that, but a locksmith can.</td>"
            "<td>Please ask a professional.</td>") in page
    assert "<script" not in page and page.count("critique/constitution.yaml, recorded by the run") == 2


def test_a_run_without_a_snapshot_falls_back_to_its_config_and_says_so(runs, tmp_path):
    a, b = runs
    (b / "critique" / "constitution.yaml").unlink()
    page = html.unescape(compare_runs(a, b, registry.report_sections(), tmp_path / "out" / "c.html").read_text())
    assert "Run B's constitution was not recorded by the run: config.constitution = default, loaded now" in page
    assert "Identical constitutions." in page  # B's config names the default, which A recorded


def test_cai_report_with_two_runs_writes_the_comparison(runs):
    a, b = runs
    result = CliRunner().invoke(app, ["report", str(a), str(b)])
    assert result.exit_code == 0, result.output
    assert (a / "compare.html").is_file() and "compare.html" in result.output
    assert "<td>critique.n_rounds</td><td>4</td><td>2</td>" in (a / "compare.html").read_text()


def test_a_bad_run_argument_is_a_one_line_error_naming_it(runs, tmp_path):
    a, _ = runs
    missing, empty = tmp_path / "nope", tmp_path / "empty"
    empty.mkdir()
    for bad, message in ((missing, "no such run directory"), (empty, "not a run directory")):
        result = CliRunner().invoke(app, ["report", str(a), str(bad)])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and str(bad) in result.output and message in result.output
    with pytest.raises(ConfigError, match="not a run directory"):
        compare_runs(empty, a, registry.report_sections())


@needs_chromium
def test_the_comparison_page_renders_in_headless_chromium(runs, tmp_path):
    a, b = runs
    broken, total, dom = render_alone(compare_runs(a, b, registry.report_sections()), tmp_path)
    assert (broken, total) == (0, 0)  # no plots, and nothing that points outside the page
    assert dom.count("<table") >= 5 and "added in B" in dom and "Ask the police. (rl)" in dom
