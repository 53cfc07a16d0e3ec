import json

import pytest

from constitutional_ai.data.store import RecordStore, read_records
from constitutional_ai.errors import ResumeError

ID = {"stage": "t", "config": "sha256:a", "constitution": "sha256:b"}


def test_writes_are_durable_and_keys_are_never_duplicated(tmp_path):
    with RecordStore(tmp_path, ID) as store:
        assert store.write([{"key": "a", "v": 1}, {"key": "b", "v": 2}, {"key": "a", "v": 3}]) == 2
        assert store.write([{"key": "b", "v": 4}, {"key": "c", "v": 5}]) == 1
        store.close(complete=True)
    assert [r["key"] for r in read_records(tmp_path / "records.jsonl")] == ["a", "b", "c"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["records"] == 3 and manifest["identity"] == ID


def test_torn_last_line_from_a_crash_is_cut_on_resume(tmp_path):
    with RecordStore(tmp_path, ID) as store:
        store.write([{"key": "a"}, {"key": "b"}])
    with (tmp_path / "records.jsonl").open("ab") as f:
        f.write(b'{"key":"c","text":"half writ')  # killed mid-write
    store = RecordStore(tmp_path, ID)
    assert store.keys == {"a", "b"}
    assert "c" not in store
    store.write([{"key": "c", "text": "whole"}])
    store.close(complete=True)
    rows = list(read_records(tmp_path / "records.jsonl"))
    assert [r["key"] for r in rows] == ["a", "b", "c"] and rows[-1]["text"] == "whole"


def test_resume_with_a_different_identity_is_refused_unless_overwrite(tmp_path):
    with RecordStore(tmp_path, ID) as store:
        store.write([{"key": "a"}])
    other = {**ID, "constitution": "sha256:other"}
    with pytest.raises(ResumeError, match=r"different constitution.*--overwrite"):
        RecordStore(tmp_path, other)
    store = RecordStore(tmp_path, other, overwrite=True)
    assert len(store) == 0
    store.close()


def test_no_resume_refuses_existing_records(tmp_path):
    with RecordStore(tmp_path, ID) as store:
        store.write([{"key": "a"}])
    with pytest.raises(ResumeError, match="resume is off"):
        RecordStore(tmp_path, ID, resume=False)
