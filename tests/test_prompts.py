import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import HH_DEV, needs_hh
from constitutional_ai.common.errors import DataError
from constitutional_ai.config import PromptSourceConfig
from constitutional_ai.data.prompts import load_prompts


def _load(path, **kw):
    return load_prompts(PromptSourceConfig(path=str(path), **kw))


def test_embedded_samples_ship_with_the_package():
    red, report = load_prompts(PromptSourceConfig(path="embedded:red_team"))
    assert len(red) >= 40 and not report.skipped
    assert all(it.messages[-1]["role"] == "user" for it in red)
    assert any(len(it.messages) > 1 for it in red)  # some multi-turn red-team conversations
    with pytest.raises(DataError, match="embedded prompt set"):
        load_prompts(PromptSourceConfig(path="embedded:nope"))


def test_jsonl_with_bad_rows_is_counted_not_crashed(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": "first"}), "{not json", json.dumps({"prompt": "  "}),
             json.dumps({"prompt": "first"}), json.dumps({"other": 1}), json.dumps({"prompt": "second"}),
             json.dumps({"messages": [{"role": "user", "content": "third"}]})]
    path.write_text("\n".join(lines) + "\n")
    items, report = _load(path)
    assert [it.messages[-1]["content"] for it in items] == ["first", "second", "third"]
    assert report.skipped == {"malformed": 2, "empty": 1, "duplicate": 1}
    assert report.examples["malformed"][0] == f"{path}:2"
    assert "skipped" in report.summary()


def test_csv_parquet_text_and_chosen_field(tmp_path):
    with (tmp_path / "p.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "question"])
        writer.writeheader()
        writer.writerows([{"id": 1, "question": "csv one"}, {"id": 2, "question": "csv two"}])
    assert [i.messages[0]["content"] for i in _load(tmp_path / "p.csv", field="question")[0]] == ["csv one", "csv two"]
    pq.write_table(pa.table({"text": ["pq one", "pq two", "pq three"]}), tmp_path / "p.parquet")
    assert len(_load(tmp_path / "p.parquet")[0]) == 3
    (tmp_path / "p.txt").write_text("line one\n\nline two\n")
    items, report = _load(tmp_path / "p.txt")
    assert len(items) == 2 and report.skipped == {"empty": 1}
    (tmp_path / "p.json").write_text(json.dumps([{"query": "json one"}]))
    assert _load(tmp_path / "p.json")[0][0].messages[0]["content"] == "json one"
    assert len(_load(tmp_path / "p.parquet", limit=2)[0]) == 2


def test_csv_and_parquet_rows_are_counted_like_jsonl_rows(tmp_path):
    (tmp_path / "p.csv").write_text('question,category\nfirst,a\n"",b\nfirst,c\nNA,d\n')
    items, report = _load(tmp_path / "p.csv", field="question")
    assert [(i.messages[0]["content"], i.index, i.meta) for i in items] == [("first", 2, {"category": "a"}),
                                                                           ("NA", 5, {"category": "d"})]
    assert report.skipped == {"empty": 1, "duplicate": 1} and report.examples["empty"] == [f"{tmp_path / 'p.csv'}:3"]
    pq.write_table(pa.table({"prompt": ["pq one", "", "pq one", "pq two"]}), tmp_path / "p.parquet")
    items, report = _load(tmp_path / "p.parquet")
    assert [i.index for i in items] == [1, 4] and report.skipped == {"empty": 1, "duplicate": 1}


def test_keys_are_content_hashes_stable_across_formats(tmp_path):
    (tmp_path / "a.txt").write_text("same prompt\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "same prompt"}) + "\n")
    assert _load(tmp_path / "a.txt")[0][0].key == _load(tmp_path / "b.jsonl")[0][0].key


def test_unknown_extension_and_missing_file_are_one_line_errors(tmp_path):
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        _load(tmp_path / "p.xlsx")
    with pytest.raises(DataError, match="not found"):
        _load(tmp_path / "missing.jsonl")


def test_hub_dataset_id_offline_fails_with_a_clear_message():
    with pytest.raises(DataError) as err:
        load_prompts(PromptSourceConfig(path="Anthropic/hh-rlhf"))
    assert "HF_HUB_OFFLINE" in str(err.value) and "\n" not in str(err.value)


@needs_hh
def test_hh_rlhf_transcripts_become_multi_turn_conversations():
    items, report = load_prompts(PromptSourceConfig(path=str(HH_DEV), format="hh"))
    assert report.read == 1500
    assert len(items) + sum(report.skipped.values()) == 1500
    assert all(it.messages[-1]["role"] == "user" for it in items)
    assert sum(len(it.messages) > 1 for it in items) > 100
    auto, _ = load_prompts(PromptSourceConfig(path=str(HH_DEV)))  # detected from the `chosen` field
    assert [i.key for i in auto] == [i.key for i in items]
