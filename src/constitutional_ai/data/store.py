"""The resumable record store: the only way stages write data.

Append-only JSONL with one key per input, written a batch at a time with a flush and fsync, next
to a manifest holding the run's config fingerprint and constitution hash. A kill at any moment
(SIGKILL included) leaves at most one partial last line, which the next open cuts off; the keys
already on disk are skipped on resume. Every stage gets exactly-once output from this one place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from constitutional_ai.errors import DataError, ResumeError

RECORDS = "records.jsonl"
MANIFEST = "manifest.json"


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Complete records of a JSONL file; a torn last line (a crash mid-write) is ignored."""
    with Path(path).open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            if line.strip():
                yield json.loads(line)


class RecordStore:
    """One stage run's output directory: ``records.jsonl`` plus ``manifest.json``.

    ``identity`` holds what makes two runs the same job (config fingerprint, constitution hash,
    stage name); opening an existing directory with a different identity is refused unless
    ``overwrite`` is set, because mixing records of two configs would silently corrupt a dataset.
    """

    def __init__(self, directory: str | Path, identity: dict[str, Any], *, resume: bool = True,
                 overwrite: bool = False, info: dict[str, Any] | None = None, key_field: str = "key"):
        self.directory = Path(directory)
        self.path = self.directory / RECORDS
        self.manifest_path = self.directory / MANIFEST
        self.identity = identity
        self.key_field = key_field
        self._keys: set[str] = set()
        if overwrite and self.directory.exists():
            for name in (RECORDS, MANIFEST):
                (self.directory / name).unlink(missing_ok=True)
        self.directory.mkdir(parents=True, exist_ok=True)
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
        self._repair_and_load_keys()
        self.manifest.update({"status": "running", "updated": time.time(), "records": len(self._keys)})
        _write_json_atomic(self.manifest_path, self.manifest)
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
        if changed:
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
        with self.path.open("rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    break
                good += len(line)
                if record is not None:
                    self._keys.add(record[self.key_field])
        if good != self.path.stat().st_size:
            with self.path.open("r+b") as f:
                f.truncate(good)

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
        _write_json_atomic(self.manifest_path, self.manifest)

    def close(self, complete: bool = False, **fields: Any) -> None:
        if self._file.closed:
            return
        self._file.close()
        self.update_manifest(status="complete" if complete else "incomplete", **fields)

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(complete=False)

    def records(self) -> Iterator[dict[str, Any]]:
        return read_records(self.path)


def remove_run(directory: str | Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
