import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from constitutional_ai.common.errors import DataError
from constitutional_ai.config import PreferenceSourceConfig
from constitutional_ai.data.readers import _load, _split, read_rows
from constitutional_ai.evaluation.labeler import load_eval_items
from constitutional_ai.preference_model.data import read_source

ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]


def _write_all(tmp_path, rows=ROWS):
    """The same rows as JSONL, JSON, CSV and Parquet."""
    paths = {fmt: tmp_path / f"rows.{fmt}" for fmt in ("jsonl", "json", "csv", "parquet")}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"].write_text(json.dumps(rows))
    paths["csv"].write_text("prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n"
                                                                  for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    return paths


@pytest.fixture
def no_shared_cache(tmp_path, monkeypatch):
    """Point datasets' default cache at an empty folder, to see whether a read leaves anything there."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def test_every_file_format_gives_the_same_rows_and_the_same_window(tmp_path, no_shared_cache):
    for fmt, path in _write_all(tmp_path).items():
        rows = list(read_rows(path))
        assert [r.data for r in rows] == ROWS, fmt
        window = list(read_rows(path, offset=2, limit=3))
        assert [r.data for r in window] == ROWS[2:5], fmt
        first = 2 if fmt == "csv" else 1  # a CSV's first row is on line 2, under its header
        assert [r.number for r in window] == [first + 2, first + 3, first + 4], fmt
        assert window[0].where == f"{path}:{first + 2}"
        assert list(read_rows(path, offset=6)) == [] and list(read_rows(path, offset=50, limit=5)) == [], fmt
    assert not no_shared_cache.exists()  # datasets converted the CSV and Parquet files without caching them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv", "rows.json", "rows.jsonl", "rows.parquet"]


def test_a_bad_jsonl_line_is_a_counted_skip_or_a_one_line_error_naming_it(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n\n{not json\n{"a": 2}\n[1, 2]\n"text"')  # a blank line; no final newline
    skipped = []
    rows = list(read_rows(path, on_bad_line=skipped.append))
    assert skipped == [f"{path}:3"]
    assert [(r.number, r.data) for r in rows] == [(1, {"a": 1}), (4, {"a": 2}), (5, [1, 2]), (6, "text")]
    with pytest.raises(DataError, match=r"p\.jsonl:3: not valid JSON") as err:
        list(read_rows(path))
    assert "\n" not in str(err.value)
    # the bad line is a row of the window (so limit counts it), and lines before the window are not parsed
    assert [r.number for r in read_rows(path, limit=2, on_bad_line=skipped.append)] == [1]
    assert [r.number for r in read_rows(path, offset=2)] == [4, 5, 6]


def test_rows_of_mixed_shapes_come_back_as_written(tmp_path):
    rows = [{"prompt": "plain"}, {"prompt": [{"role": "user", "content": "a list this time"}]},
            {"messages": [{"role": "user", "content": "x"}], "category": "only here"}, {"prompt": 3}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.data for r in read_rows(path)] == rows  # Arrow would refuse, or pad every row with nulls
    (tmp_path / "mixed.json").write_text(json.dumps({"version": 2, "rows": rows}))
    assert [r.data for r in read_rows(tmp_path / "mixed.json")] == rows  # an object stands for its list


def test_csv_cells_are_kept_as_written(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,question\n1,""\n2,NA\n3,"two, with a comma"\n')
    assert [r.data["question"] for r in read_rows(path)] == ["", "NA", "two, with a comma"]
    (tmp_path / "header.csv").write_text("id,question\n")
    assert list(read_rows(tmp_path / "header.csv")) == []


def test_a_split_is_sliced_by_datasets_unless_it_is_already_a_slice(tmp_path):
    assert _split("train", 0, None) == ("train", False)
    assert _split("train", 100, 100) == ("train[100:200]", False)
    assert _split("test", 5, None) == ("test[5:]", False)
    assert _split("train[:10%]", 5, 2) == ("train[:10%]", True)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"n": list(range(10))}), path)
    ds = _load("parquet", "train[4:]", 1, 2, data_files=str(path), cache_dir=str(tmp_path / "c"), keep_in_memory=True)
    assert [r["n"] for r in ds] == [5, 6]


def test_files_that_cannot_be_read_are_one_line_errors(tmp_path):
    (tmp_path / "p.xlsx").write_text("x")
    (tmp_path / "bad.parquet").write_text("not parquet")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"a": "caf\xe9"}\n')
    (tmp_path / "bad.json").write_text('[{"a": 1},\n{"a": ]')
    for name, message in [("p.xlsx", "unknown file type '.xlsx'"), ("bad.parquet", "cannot be read as parquet"),
                          ("latin1.jsonl", "not UTF-8 text"), ("bad.json", r"not valid JSON \(line 2\)")]:
        with pytest.raises(DataError, match=message) as err:
            list(read_rows(tmp_path / name))
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="format 'hub' needs a hub dataset id"):
        list(read_rows(tmp_path / "p.xlsx", "hub"))


def test_hub_ids_fail_offline_in_one_line_and_paths_never_reach_the_hub(tmp_path):
    with pytest.raises(DataError) as err:  # conftest sets HF_HUB_OFFLINE: nothing is downloaded
        list(read_rows("Anthropic/hh-rlhf", data_dir="harmless-base", offset=10, limit=5))
    assert "HF_HUB_OFFLINE" in str(err.value) and "\n" not in str(err.value)
    for spec in (str(tmp_path / "missing.jsonl"), "./data/train.parquet", "missing.csv"):
        with pytest.raises(DataError, match="file not found; check it"):
            list(read_rows(spec, missing_hint="; check it"))
    with pytest.raises(DataError, match="file not found"):  # a file format was asked for: no hub lookup
        list(read_rows("Anthropic/hh-rlhf", "jsonl"))


def test_preference_pairs_read_the_same_from_every_format(tmp_path):
    paths = _write_all(tmp_path)
    expected = None
    for fmt, path in paths.items():
        pairs, report = read_source(PreferenceSourceConfig(path=str(path), offset=1, limit=4))
        assert report.read == 4, fmt
        got = [(p.prompt, p.chosen, p.rejected, p.p) for p in pairs]
        expected = expected or got
        assert got == expected and got[0][1] == "good 1", fmt
    with pytest.raises(DataError, match="unknown preference file type"):
        (tmp_path / "p.txt").write_text("x\n")
        read_source(PreferenceSourceConfig(path=str(tmp_path / "p.txt")))


def test_eval_items_from_jsonl_name_the_line_and_keep_their_keys(tmp_path):
    pair = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(pair) + "\n\n" + json.dumps(pair))  # a blank line, and no final newline
    items = load_eval_items(str(path))
    assert len(items) == 2 and items[1].key.startswith("p2-")  # keys count records, not lines
    path.write_text(json.dumps(pair) + "\n\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"eval\.jsonl:3: neither a multiple-choice record"):
        load_eval_items(str(path))
