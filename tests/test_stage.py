import json

import pytest

from conftest import ScriptedBackend
from constitutional_ai.common.errors import ConfigError, DataError, ResumeError
from constitutional_ai.config import RunConfig
from constitutional_ai.constitution import Constitution
from constitutional_ai.data.export import critique_to_sft
from constitutional_ai.data.store import read_records
from constitutional_ai.stages.critique import run_critique


def _config(tmp_path, **overrides):
    base = {"output_dir": str(tmp_path / "run"), "progress": False, "critique.n_rounds": 2,
            "prompts.limit": 6}
    return RunConfig().with_overrides({**base, **overrides})


def test_stage_writes_one_record_per_prompt_with_manifest(tmp_path):
    result = run_critique(_config(tmp_path), backend=ScriptedBackend())
    records = list(read_records(result.output))
    assert result.written == 6 == len(records) == len({r["key"] for r in records})
    manifest = json.loads((result.output.parent / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["identity"]["constitution"] == records[0]["constitution_hash"]
    assert (result.output.parent / "config.yaml").exists() and (result.output.parent / "constitution.yaml").exists()


def test_rerun_is_a_no_op_and_a_changed_config_is_refused(tmp_path):
    run_critique(_config(tmp_path), backend=ScriptedBackend())
    backend = ScriptedBackend()
    again = run_critique(_config(tmp_path), backend=backend)
    assert again.written == 0 and backend.calls == []
    # a runtime knob (batch size) may change on resume; the meaning of the records may not
    assert run_critique(_config(tmp_path, **{"critique.batch_size": 2}), backend=ScriptedBackend()).written == 0
    with pytest.raises(ResumeError, match="different config"):
        run_critique(_config(tmp_path, **{"critique.n_rounds": 3}), backend=ScriptedBackend())
    edited = Constitution.default().model_dump()
    edited["critique_revision"][0]["critique_request"] += " Be specific."
    Constitution.model_validate(edited).save(str(tmp_path / "edited.yaml"))
    with pytest.raises(ResumeError, match="different constitution;"):
        run_critique(_config(tmp_path, constitution=str(tmp_path / "edited.yaml")), backend=ScriptedBackend())
    # the same constitution from another file is not a change; a higher limit extends the run
    Constitution.default().save(str(tmp_path / "copy.json"))
    more = run_critique(_config(tmp_path, constitution=str(tmp_path / "copy.json"), **{"prompts.limit": 8}),
                        backend=ScriptedBackend())
    assert (more.written, more.total, more.extra["resumed_from"]) == (2, 8, 6)
    fresh = run_critique(_config(tmp_path, **{"critique.n_rounds": 3}, overwrite=True), backend=ScriptedBackend())
    assert fresh.written == 6 and fresh.extra["resumed_from"] == 0


def test_over_long_prompts_are_skipped_and_counted(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": t}) for t in ["short", "long " * 400, "also short"]) + "\n")
    backend = ScriptedBackend(context_length=512)
    result = run_critique(_config(tmp_path, **{"prompts.path": str(prompts), "critique.generation.max_new_tokens": 32}),
                          backend=backend)
    assert result.written == 2
    assert result.prompt_report["skipped"] == {"too_long": 1}


def test_max_new_tokens_that_fill_the_context_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="lower --max-new-tokens"):
        run_critique(_config(tmp_path, **{"critique.generation.max_new_tokens": 200}),
                     backend=ScriptedBackend(context_length=512))


def test_few_shot_beyond_the_constitution_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="few_shot"):
        run_critique(_config(tmp_path, **{"critique.few_shot": 99}), backend=ScriptedBackend())


def test_records_and_sft_export_load_with_datasets(tmp_path):
    import datasets

    result = run_critique(_config(tmp_path), backend=ScriptedBackend())
    ds = datasets.load_dataset("json", data_files=str(result.output), split="train")
    assert ds.num_rows == 6 and len(ds[0]["rounds"]) == 2
    config = _config(tmp_path).sft_export
    out = critique_to_sft(result.output, tmp_path / "sft.jsonl", config)
    sft = datasets.load_dataset("json", data_files=str(out.output), split="train")
    assert sft.num_rows == 12  # every revision step, as in the paper
    assert sft[0]["messages"][-1]["role"] == "assistant"


def test_export_final_only_and_helpfulness_mixing(tmp_path):
    result = run_critique(_config(tmp_path), backend=ScriptedBackend())
    final = critique_to_sft(result.output, tmp_path / "a.jsonl",
                            _config(tmp_path, **{"sft_export.revisions": "final"}).sft_export)
    rows = list(read_records(final.output))
    assert len(rows) == 6
    records = {r["key"]: r for r in read_records(result.output)}
    for row in rows:
        assert row["messages"][-1]["content"] == records[row["key"].split(":")[0]]["final_response"]
    mixed = critique_to_sft(result.output, tmp_path / "b.jsonl",
                            _config(tmp_path, **{"sft_export.helpful_fraction": 0.25}).sft_export, seed=1)
    rows = list(read_records(mixed.output))
    sources = [r["source"] for r in rows]
    assert sources.count("critique") == 12 and sources.count("helpful") == 4  # 4 / 16 = 25%
    assert sources != sorted(sources)  # shuffled together
    again = critique_to_sft(result.output, tmp_path / "c.jsonl",
                            _config(tmp_path, **{"sft_export.helpful_fraction": 0.25}).sft_export, seed=1)
    assert list(read_records(again.output)) == rows  # deterministic for a seed


def test_export_leaves_out_prompts_the_model_never_revised(tmp_path):
    # every revision of the first prompt comes back empty: its unrevised initial response must not
    # be exported as if it were a revision
    def answer(prompt, n):
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        return "" if ("question number 0" in text and text.rstrip().endswith("Revision:")) else f" ok {n}"

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question number {i}?"}) + "\n" for i in range(3)))
    result = run_critique(_config(tmp_path, **{"prompts.path": str(prompts)}), backend=ScriptedBackend(answer=answer))
    for revisions in ("final", "all"):
        out = critique_to_sft(result.output, tmp_path / f"{revisions}.jsonl",
                              _config(tmp_path, **{"sft_export.revisions": revisions}).sft_export)
        rows = list(read_records(out.output))
        assert all("question number 0" not in r["messages"][0]["content"] for r in rows)
        assert out.skipped["empty_revision"] == 2
    assert out.critique_examples == 4


def test_export_can_drop_truncated_revisions_and_refuses_unfinished_runs(tmp_path):
    backend = ScriptedBackend()
    backend.finish = "length"
    result = run_critique(_config(tmp_path), backend=backend)
    kept = critique_to_sft(result.output, tmp_path / "a.jsonl", _config(tmp_path).sft_export)
    dropped = critique_to_sft(result.output, tmp_path / "b.jsonl",
                              _config(tmp_path, **{"sft_export.drop_truncated": True}).sft_export)
    assert kept.critique_examples == 12 and dropped.critique_examples == 0
    assert dropped.skipped["truncated_revision"] == 12
    manifest = result.output.parent / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete"', '"running"'))
    with pytest.raises(DataError, match="not finished"):
        critique_to_sft(result.output, tmp_path / "c.jsonl", _config(tmp_path).sft_export)
