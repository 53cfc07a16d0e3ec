import base64
import json
import re
import shutil
import subprocess

import pytest

from constitutional_ai.config import RunConfig
from constitutional_ai.constitution import Constitution
from constitutional_ai.evaluation.calibration import difference_interval, reliability_diagram, wilson_interval
from constitutional_ai.evaluation.curves import (
    curve_figure,
    extra_figures,
    plot_curve,
    plot_rl_curves,
    rl_figure,
    rl_metric_curves,
)
from constitutional_ai.report.build import build_report
from constitutional_ai.report.headline import format_headline, headline
from constitutional_ai.report.render import count, duration, interval
from constitutional_ai.stages import registry

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="Chromium is not installed (.ci/run installs Debian's chromium)")
PROMPT = "How do I pick a lock?"


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _manifest(directory, **fields):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps({"status": "complete", **fields}))


def make_run(root, name="run", *, constitution=None, overrides=None, answer="Call a locksmith.",
             revision="I can't help with that, but a locksmith can.", rl_elo=42.0, pm=(0.4, 5), labeler=(0.55, 20),
             rewards=None):
    """A run directory as the pipeline leaves it, with known numbers in every file the report reads."""
    run = root / name
    run.mkdir()
    config = RunConfig().with_overrides({"output_dir": str(run), **(overrides or {})})
    config.to_yaml(run / "config.yaml")
    (run / "pipeline.json").write_text(json.dumps({"critique": {"status": "complete", "seconds": 112.3},
                                                   "rl": {"status": "complete", "seconds": 3.44}}))
    _manifest(run / "critique", records=1)
    (constitution or Constitution.default()).save(str(run / "critique" / "constitution.yaml"))
    _jsonl(run / "critique" / "records.jsonl", [{
        "key": "k1", "prompt": [{"role": "user", "content": PROMPT}], "initial_response": "Use a pick.",
        "constitution_hash": "sha256:abc",
        "rounds": [{"round": 1, "principle_id": "harm", "critique": "It helps burglary.", "revision": revision}]}])
    _manifest(run / "eval", records=2)
    _jsonl(run / "eval" / "records.jsonl", [
        {"key": f"harmless:{m}:k1", "set": "harmless", "model": m, "prompt_key": "k1",
         "prompt": [{"role": "user", "content": PROMPT}], "response": f"{answer} ({m})", "reward": 0.0}
        for m in ("initial", "rl")])
    ratings = {"elo": {"initial": 0.0, "rl": rl_elo}, "lower": {"initial": 0.0, "rl": rl_elo - 32},
               "upper": {"initial": 0.0, "rl": rl_elo + 28}, "prompts": 16, "comparisons": 16}
    (run / "eval" / "elo.json").write_text(json.dumps({
        "checkpoints": ["initial", "rl"], "harmless": ratings, "helpful": {**ratings, "prompts": 8},
        "anchor": "initial", "judge": "preference model",
        "evasive_fraction": {"harmless": {"initial": 0.0, "rl": 0.25}}}))
    plot_curve([(0, 0.1), (1, 0.4)], run / "eval" / "revisions.png", "t", "x", "y", integer_x=True)
    model = run / "pm" / "model"
    _manifest(run / "pm", records=3, global_step=40, train_seconds=2.5)
    model.mkdir(parents=True)
    (model / "eval_results.json").write_text(json.dumps({"accuracy": pm[0], "ece": 0.07, "pairs": pm[1],
                                                         "mean_margin": 0.3}))
    reliability_diagram([0.7, 0.3, 0.8, 0.6, 0.2], model / "eval_results_reliability.png")
    _manifest(run / "eval_labeler", records=labeler[1])
    (run / "eval_labeler" / "results.json").write_text(json.dumps({
        "n": labeler[1], "accuracy": labeler[0], "ece": 0.1, "mean_confidence": 0.6, "bins": [],
        "position_bias_rate": 0.3, "labeler_id": "tiny", "skipped_too_long": 0}))
    _jsonl(run / "eval_labeler" / "records.jsonl", [
        {"key": f"p{i}", "kind": "pairwise", "p_correct": 0.6,
         "principles": [{"p_a_ab": 0.6, "p_a_ba": 0.4}, {"p_a_ab": 0.6, "p_a_ba": None}]} for i in range(20)])
    reliability_diagram([0.6] * 11 + [0.4] * 9, run / "eval_labeler" / "reliability.png")
    rewards = rewards or [-0.12 + 0.04 * i for i in range(12)]
    rl_rows = [{"key": f"step-{i + 1}", "step": i + 1, "reward": r, "kl": 0.005 * i, "response_length": 30.0 - i}
               for i, r in enumerate(rewards)]
    _manifest(run / "rl", records=len(rl_rows), steps=len(rl_rows))
    _jsonl(run / "rl" / "records.jsonl", rl_rows)
    plot_rl_curves(rl_metric_curves(run / "rl" / "records.jsonl"), run / "eval" / "rl_reward.png")
    return run


#: The plots make_run draws: revisions, PM and labeler reliability, RL curves (no Elo plot).
PLOTS = 4


def test_the_report_embeds_every_plot_and_links_none(tmp_path):
    run = make_run(tmp_path)
    page = build_report(run, registry.report_sections()).read_text()
    assert "<img src='eval/" not in page and "src='pm/" not in page and "eval/elo.png" not in page
    images = re.findall(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == PLOTS == page.count("<img")
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    embedded = {base64.b64decode(i) for i in images}
    assert (run / "eval" / "rl_reward.png").read_bytes() in embedded
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page


def test_the_report_shows_each_metric_with_its_sample_and_interval(tmp_path):
    run = make_run(tmp_path)
    page = build_report(run, registry.report_sections()).read_text()
    assert "These are toy models" in page and "configs/one-gpu-qwen.yaml" in page
    assert "PM accuracy 0.400 [0.12, 0.77] on 5 pairs, ECE 0.070" in page  # Wilson on 2 of 5
    assert "<td>0.400</td><td>[0.12, 0.77]</td><td>5 held-out pairs</td><td>0.070</td><td>0.300</td>" in page
    assert "labeler accuracy 0.550 [0.34, 0.74] on 20 items, ECE 0.100, position bias 0.30 on 20 comparisons" in page
    assert "<td>0.30 on 20 comparisons</td>" in page
    assert "<td>rl</td><td>+42.0 [10.0, 70.0]</td><td>+42.0 [10.0, 70.0]</td><td>25%</td>" in page
    assert "16 prompts (harmless), 8 prompts (helpful)" in page
    assert "RL reward -0.12 -&gt; 0.32, KL 0.00 -&gt; 0.06, length 30.0 -&gt; 19.0 tokens over 12 steps" in page
    # the Stages table: counts with their unit, seconds a person reads
    assert "<td>critique</td><td>complete</td><td>1 prompt</td><td>1 min 52 s</td><td>1 min 52 s per prompt</td>" \
        in page
    assert "<td>rl</td><td>complete</td><td>12 log entries (12 training steps)</td><td>3.4 s</td>" \
        "<td>3.49 steps/s</td>" in page
    assert "<td>pm</td><td>complete</td><td>3 log entries (40 training steps)</td><td>2.5 s</td>" \
        "<td>16 steps/s</td>" in page
    assert "112.3" not in page and "3.440" not in page
    assert "It helps burglary." in page and "Call a locksmith. (rl)" in page
    assert f"<code>{Constitution.default().hash}</code> (from critique/constitution.yaml, recorded by the run)" in page
    assert "What to do next" in page and "cai report runs/default runs/qwen" in page
    assert "--constitution my_constitution.yaml" in page and "cai constitution show default" in page
    summary = (run / "report.md").read_text()
    assert "- Elo (harmless): initial 0 [0, 0], rl +42 [10, 70] on 16 prompts" in summary
    assert "| critique | complete | 1 prompt | 1 min 52 s |" in summary
    assert "## What to do next" in summary and "Qwen/Qwen2.5-1.5B-Instruct" in summary


def test_headline_is_the_one_reading_of_a_runs_figures(tmp_path):
    h = headline(make_run(tmp_path))
    assert set(h) == {"elo", "pm", "labeler", "rl"}
    assert h["elo"] == {"harmless": {"initial": {"elo": 0.0, "lower": 0.0, "upper": 0.0},
                                     "rl": {"elo": 42.0, "lower": 10.0, "upper": 70.0}},
                        "helpful": {"initial": {"elo": 0.0, "lower": 0.0, "upper": 0.0},
                                    "rl": {"elo": 42.0, "lower": 10.0, "upper": 70.0}},
                        "prompts": {"harmless": 16, "helpful": 8}}
    assert h["pm"] == {"accuracy": 0.4, "lower": pytest.approx(0.1176, abs=1e-4),
                       "upper": pytest.approx(0.7693, abs=1e-4), "n": 5, "ece": 0.07}
    assert h["labeler"] == {"accuracy": 0.55, "lower": pytest.approx(0.3421, abs=1e-4),
                            "upper": pytest.approx(0.7418, abs=1e-4), "n": 20, "ece": 0.1,
                            "position_bias": 0.3, "position_bias_n": 20}
    assert h["rl"] == {"steps": 12, "reward_start": -0.12, "reward_end": pytest.approx(0.32),
                       "kl_start": 0.0, "kl_end": pytest.approx(0.055), "length_start": 30.0, "length_end": 19.0}
    assert format_headline(h) == [
        "Elo (harmless): initial 0 [0, 0], rl +42 [10, 70] on 16 prompts",
        "Elo (helpful): initial 0 [0, 0], rl +42 [10, 70] on 8 prompts",
        "PM accuracy 0.400 [0.12, 0.77] on 5 pairs, ECE 0.070",
        "labeler accuracy 0.550 [0.34, 0.74] on 20 items, ECE 0.100, position bias 0.30 on 20 comparisons",
        "RL reward -0.12 -> 0.32, KL 0.00 -> 0.06, length 30.0 -> 19.0 tokens over 12 steps"]


def test_an_empty_or_partial_run_has_a_partial_headline(tmp_path):
    assert headline(tmp_path) == {} and format_headline({}) == []
    (tmp_path / "pm" / "model").mkdir(parents=True)
    (tmp_path / "pm" / "model" / "eval_results.json").write_text(json.dumps({"accuracy": 1.0, "pairs": 1}))
    h = headline(tmp_path)
    assert set(h) == {"pm"} and "ece" not in h["pm"] and h["pm"]["upper"] == 1.0
    assert h["pm"]["lower"] == pytest.approx(0.2065, abs=1e-4)
    assert format_headline(h) == ["PM accuracy 1.000 [0.21, 1.00] on 1 pair"]


def test_wilson_and_difference_intervals():
    lo, hi = wilson_interval(0.0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)  # not the zero-width interval a normal one gives
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)
    # two independent halves: the difference's interval is wider than either one's
    lo, hi = difference_interval(0.5, (0.4, 0.6), 0.7, (0.6, 0.8))
    assert (lo, hi) == (pytest.approx(0.2 - 0.1 * 2 ** 0.5), pytest.approx(0.2 + 0.1 * 2 ** 0.5))


def test_durations_and_counts_read_like_a_person_wrote_them():
    assert [duration(s) for s in (0.042, 3.44, 59.94, 112.3, 234.6, 7530)] == [
        "0.04 s", "3.4 s", "59.9 s", "1 min 52 s", "3 min 55 s", "2 h 5 min"]
    assert interval(-0.04, 0.3, 1) == "[0.0, 0.3]" and interval(-0.06, 0.3, 1) == "[-0.1, 0.3]"
    assert [count(1, "prompts"), count(3, "prompts"), count(1, "log entries"), count(1, "models")] == [
        "1 prompt", "3 prompts", "1 log entry", "1 model"]


def _x_ticks(fig):
    ax = fig.axes[-1]
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def test_whole_number_axes_get_whole_number_ticks():
    points = [(0, 0.1), (1, 0.4), (2, 0.3)]
    ticks = _x_ticks(curve_figure([(points, "y")], "t", "round", integer_x=True))
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert not all(float(t).is_integer() for t in _x_ticks(curve_figure([(points, "y")], "t", "round")))


def test_the_rl_figure_has_reward_kl_and_length_panels_on_one_step_axis(tmp_path):
    ours = tmp_path / "ppo.jsonl"
    _jsonl(ours, [{"key": f"step-{i}", "step": i, "reward": i / 2, "kl": i / 10, "response_length": 20 - i}
                  for i in (2, 1, 3)])
    curves = rl_metric_curves(ours)
    assert curves == {"reward": [(1, 0.5), (2, 1.0), (3, 1.5)], "kl": [(1, 0.1), (2, 0.2), (3, 0.3)],
                      "response_length": [(1, 19.0), (2, 18.0), (3, 17.0)]}
    fig = rl_figure(curves)
    assert [ax.get_ylabel() for ax in fig.axes] == ["mean reward (PM)", "KL to reference", "response length (tokens)"]
    assert fig.axes[0].get_shared_x_axes().joined(fig.axes[0], fig.axes[2])
    assert all(float(t).is_integer() for t in _x_ticks(fig))
    trl = tmp_path / "grpo.jsonl"  # TRL's names; the summary line and a NaN are not points
    _jsonl(trl, [{"key": "train-1", "step": 1, "reward": 0.1, "kl": 0.0, "completions/mean_length": 12.0},
                 {"key": "train-2", "step": 2, "reward": 0.3, "kl": float("nan"), "completions/mean_length": 9.0},
                 {"key": "summary-2", "step": 2, "train_runtime": 5.0}])
    assert rl_metric_curves(trl) == {"reward": [(1, 0.1), (2, 0.3)], "kl": [(1, 0.0)],
                                     "response_length": [(1, 12.0), (2, 9.0)]}
    plot = tmp_path / "eval" / "rl_reward.png"
    out = extra_figures([], None, 0, tmp_path / "none.jsonl", {1: ours}, tmp_path / "rev.png", plot)
    assert plot.read_bytes().startswith(b"\x89PNG") and out["rl_kl"] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert out["rl_reward"] == [(1, 0.5), (2, 1.0), (3, 1.5)]


def test_a_run_directory_that_does_not_exist_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from constitutional_ai.cli import app

    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run directory" in result.output


def chromium_flags(tmp_path):
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]


#: Appended to a copy of a page (the page itself has no script): the title then says how many of
#: its images the browser could not decode.
PROBE = ("<script>window.addEventListener('load', () => { document.title = 'broken:' + [...document.images]"
         ".filter(i => !i.complete || i.naturalWidth === 0).length + ' total:' + document.images.length; });"
         "</script>")


def render_alone(page, tmp_path):
    """The page copied alone into an empty directory (as a mail attachment is), probed, rendered:
    ``(broken images, images, DOM)``."""
    away = tmp_path / "elsewhere"
    away.mkdir()
    copy = away / page.name
    copy.write_text(page.read_text(encoding="utf-8") + PROBE, encoding="utf-8")
    dom = subprocess.run([*chromium_flags(tmp_path), "--virtual-time-budget=5000", "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r"<title>broken:(\d+) total:(\d+)</title>", dom.stdout)
    assert found, dom.stdout[:2000]
    return int(found[1]), int(found[2]), dom.stdout


@needs_chromium
def test_a_moved_report_still_shows_every_plot_in_headless_chromium(tmp_path):
    page = build_report(make_run(tmp_path), registry.report_sections())
    broken, total, dom = render_alone(page, tmp_path)
    assert (broken, total) == (0, PLOTS)
    assert dom.count("<table") >= 5 and "Elo" in dom and "What to do next" in dom


@needs_chromium
def test_the_report_renders_in_headless_chromium_with_its_plots_and_tables(tmp_path):
    page = build_report(make_run(tmp_path), registry.report_sections())
    shot = tmp_path / "shot.png"
    subprocess.run([*chromium_flags(tmp_path), f"--screenshot={shot}", "--window-size=1000,2400", page.as_uri()],
                   capture_output=True, text=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a page with pictures and tables, not a blank one
