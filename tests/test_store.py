import json

import pytest

from constitutional_ai.common.errors import DataError, ResumeError
from constitutional_ai.data.store import RecordStore, read_records

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


def test_a_bad_line_mid_file_is_an_error_not_a_silent_truncation(tmp_path):
    with RecordStore(tmp_path, ID) as store:
        store.write([{"key": "a"}, {"key": "b"}, {"key": "c"}])
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    with pytest.raises(DataError, match=r"records.jsonl:2: not valid JSON"):
        RecordStore(tmp_path, ID)
    assert path.read_text().count("\n") == 4  # nothing was cut
    path.write_text(lines[0] + "[1, 2]\n" + "".join(lines[1:]))
    with pytest.raises(DataError, match=r"records.jsonl:2: not a record with a 'key' field"):
        RecordStore(tmp_path, ID)


def test_one_writer_per_run_directory(tmp_path):
    first = RecordStore(tmp_path, ID)
    with pytest.raises(ResumeError, match="another process is writing"):
        RecordStore(tmp_path, ID)
    first.close()
    RecordStore(tmp_path, ID).close()  # released on close
