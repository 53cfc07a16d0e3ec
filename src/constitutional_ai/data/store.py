"""The resumable record store: the only way stages write data.

Append-only JSONL with one key per input, written a batch at a time with a flush and fsync, next
to a manifest holding the run's config fingerprint and constitution hash. A kill at any moment
(SIGKILL included) leaves at most one partial last line, which the next open cuts off; the keys
already on disk are skipped on resume. Every stage gets exactly-once output from this one place.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from constitutional_ai.common.errors import DataError, ResumeError

RECORDS = "records.jsonl"
MANIFEST = "manifest.json"


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file, then rename it into place: readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _scan(path: Path, key_field: str | None = None) -> Iterator[tuple[int, int, dict[str, Any] | None]]:
    """``(end offset, line number, record)`` for each complete line; ``record`` is None for a blank line.

    Only an unterminated (or unparseable) *last* line is a crash leftover and is silently
    ignored; a bad line with good lines after it means the file was edited or corrupted, and
    that is an error rather than a reason to drop everything after it.
    """
    offset = 0
    with path.open("rb") as f:
        lines = iter(f)
        line = next(lines, None)
        n = 0
        while line is not None:
            n += 1
            following = next(lines, None)
            last = following is None
            if not line.endswith(b"\n"):
                return  # torn by a crash mid-write: the caller cuts it
            record: Any = None
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as exc:  # bad JSON, invalid UTF-8, NUL bytes
                    if last:
                        return
                    what = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"
                    raise DataError(f"{path}:{n}: {what}; fix or delete that line, or pass --overwrite "
                                    "to start fresh") from None
                if not isinstance(record, dict) or (key_field is not None and key_field not in record):
                    raise DataError(f"{path}:{n}: not a record with a {key_field or 'JSON object'!r} field; fix or "
                                    "delete that line, or pass --overwrite to start fresh")
            offset += len(line)
            yield offset, n, record
            line = following


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Complete records of a JSONL file; a torn last line (a crash mid-write) is ignored."""
    for _, _, record in _scan(Path(path)):
        if record is not None:
            yield record


def _changed_fields(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    """The dotted config fields whose values differ (``critique.n_rounds: 4 -> 2``), when both are known."""
    if not old or not new:
        return []
    keys = sorted(set(old) | set(new))
    return [f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


class RecordStore:
    """One stage run's output directory: ``records.jsonl`` plus ``manifest.json``.

    ``identity`` holds what makes two runs the same job (config fingerprint, constitution hash,
    stage name); opening an existing directory with a different identity is refused unless
    ``overwrite`` is set, because mixing records of two configs would silently corrupt a dataset.
    """

    def __init__(self, directory: str | Path, identity: dict[str, Any], *, resume: bool = True,
                 overwrite: bool = False, info: dict[str, Any] | None = None, key_field: str = "key",
                 fields: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self.fields = fields  # the config values behind identity["config"], so a refusal can name them
        self.path = self.directory / RECORDS
        self.manifest_path = self.directory / MANIFEST
        self.identity = identity
        self.key_field = key_field
        self._keys: set[str] = set()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock()
        if overwrite:
            for name in (RECORDS, MANIFEST):
                (self.directory / name).unlink(missing_ok=True)
        manifest = self._read_manifest()
        if manifest is not None:
            self._check_identity(manifest, resume)
            self.manifest = manifest
            self.manifest["resumed"] = self.manifest.get("resumed", 0) + 1
        else:
            if self.path.exists() and self.path.stat().st_size:
                raise ResumeError(f"{self.path}: records without a manifest; move them away or pass --overwrite")
            self.manifest = {"identity": identity, "created": time.time(), "status": "running",
                             "resumed": 0, **(info or {})}
        if fields is not None:
            self.manifest["fields"] = fields
        self._repair_and_load_keys()
        self.manifest.update({"status": "running", "updated": time.time(), "records": len(self._keys)})
        write_atomic(self.manifest_path, json.dumps(self.manifest, indent=2, ensure_ascii=False))
        self._file = self.path.open("ab")

    # -- opening ---------------------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise DataError(f"{self.manifest_path}: unreadable manifest; pass --overwrite to start fresh") from None

    def _check_identity(self, manifest: dict[str, Any], resume: bool) -> None:
        old = manifest.get("identity", {})
        changed = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
        if changed and manifest.get("status") != "complete" and not (self.path.exists() and self.path.stat().st_size):
            manifest["identity"] = self.identity  # a failed start left nothing: the corrected run takes its place
            return
        if changed:
            fields = _changed_fields(manifest.get("fields"), self.fields)
            if fields and "config" in changed:
                changed = [f"config ({'; '.join(fields)})" if c == "config" else c for c in changed]
            raise ResumeError(
                f"{self.directory}: holds a run with a different {', '.join(changed)}; pass --overwrite to "
                "discard it and start fresh, or choose another --output-dir")
        if not resume and self.path.exists() and self.path.stat().st_size:
            raise ResumeError(f"{self.directory}: already holds records and resume is off; pass --overwrite "
                              "to start fresh or --resume to continue")

    def _repair_and_load_keys(self) -> None:
        """Cut a torn last line left by a crash, then index the keys already written."""
        if not self.path.exists():
            return
        good = 0
        first_line: dict[str, int] = {}
        for good, n, record in _scan(self.path, self.key_field):  # noqa: B007 - the last offset is kept
            if record is None:
                continue
            key = record[self.key_field]
            if key in first_line:  # never written twice by us: the file was edited or concatenated
                raise DataError(f"{self.path}:{n}: key {key!r} is already on line {first_line[key]}; delete one of "
                                "the two lines, or pass --overwrite to start fresh")
            first_line[key] = n
            self._keys.add(key)
        if good != self.path.stat().st_size:
            with self.path.open("r+b") as f:
                f.truncate(good)

    def _lock(self) -> None:
        """One writer per stage directory: two processes appending the same keys would duplicate them."""
        self._lock_file = (self.directory / ".lock").open("w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise ResumeError(f"{self.directory}: another process is writing this run; wait for it to finish "
                              "or choose another --output-dir") from None

    # -- writing ---------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(self._keys)

    def write(self, records: Iterable[dict[str, Any]]) -> int:
        """Append a batch durably; records whose key is already present are dropped, not duplicated."""
        lines, new = [], []
        for record in records:
            key = record[self.key_field]
            if key in self._keys or key in new:
                continue
            new.append(key)
            lines.append(_dumps(record) + "\n")
        if lines:
            self._file.write("".join(lines).encode("utf-8"))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._keys.update(new)
        return len(lines)

    def update_manifest(self, **fields: Any) -> None:
        self.manifest.update(fields, updated=time.time(), records=len(self._keys))
        write_atomic(self.manifest_path, json.dumps(self.manifest, indent=2, ensure_ascii=False))

    def close(self, complete: bool = False, **fields: Any) -> None:
        if self._file.closed:
            return
        self._file.close()
        self.update_manifest(status="complete" if complete else "incomplete", **fields)
        self._lock_file.close()  # releases the lock

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(complete=False)

    def records(self) -> Iterator[dict[str, Any]]:
        return read_records(self.path)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is missing, torn or not an object: readers of a run's
    summaries (the report, the export cards) show what they can rather than fail on one file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
