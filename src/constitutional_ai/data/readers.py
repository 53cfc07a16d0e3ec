"""The one reader of tabular data: prompt sources, preference pairs and eval sets all come through here.

Which formats go through Hugging Face ``datasets`` and which do not:

- **Hub datasets, Parquet and CSV go through** ``datasets.load_dataset``. Their rows have one
  schema, so Arrow loses nothing, and ``offset``/``limit`` become a split slice
  (``train[100:200]``) instead of reading rows only to throw them away. Local files are converted
  in a temporary cache directory and held in memory, so no Arrow cache is left behind (not in
  the repository, not in ``~/.cache``); the Hub keeps the user's usual cache, since that is where
  the download lives. CSV cells are kept as written (``keep_default_na=False``): an empty
  prompt is an empty string, as in JSON, not a missing value, and ``NA`` stays a word; a column
  holding only numbers does read as numbers, which a ``p_chosen`` column needs.
- **JSONL, JSON and text do not.** Users' JSON files mix row shapes (a ``prompt`` string in one
  row, a ``messages`` list in the next; fields only some rows have), which Arrow's schema
  inference rejects or pads with nulls, changing the rows. And one bad line fails a ``datasets``
  load as a whole with no line number, whereas a bad line here has to be either a counted skip or
  a one-line error naming ``file:line`` while the rest of the file is read. Text is read with the
  same line loop, because a line is a row and its number is then exact.

Every row comes with where it came from, for messages: ``file:N`` (the line for JSONL, text and
CSV; the record's position for JSON and Parquet) or ``dataset[split]:index`` (an index into that
split, as ``ds[index]`` takes it).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

from constitutional_ai.common.errors import DataError, first_line
from constitutional_ai.common.hub import hub_offline_reason, looks_like_path, quiet_hub_logs

FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
FORMATS = ("auto", "jsonl", "json", "csv", "parquet", "text", "hub")
#: The Arrow-backed file formats, read by ``datasets``' packaged builders of the same name.
ARROW_FORMATS = ("csv", "parquet")


class Row(NamedTuple):
    number: int  # 1-based: a line (JSONL, text, CSV) or a record's position (JSON, Parquet, hub)
    where: str  # ``file:N`` or ``dataset[split]:index``, to put in front of a message about this row
    data: Any


def file_format(path: str | Path, fmt: str = "auto", name: str | None = None) -> str:
    """The file format ``fmt`` names, ``auto`` going by the suffix."""
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in FILE_FORMATS:
        return FILE_FORMATS[suffix]
    raise DataError(f"{name or path}: unknown file type {suffix!r}; set the format to jsonl, json, csv, parquet "
                    "or text")


def is_hub_id(source: str) -> bool:
    """No such local file, and the name does not look like a path: a Hugging Face dataset id."""
    return not Path(source).expanduser().exists() and not looks_like_path(source, FILE_FORMATS)


def read_rows(source: str | Path, format: str = "auto", *, name: str | None = None, split: str = "train",
              subset: str | None = None, data_dir: str | None = None, offset: int = 0, limit: int | None = None,
              on_bad_line: Callable[[str], None] | None = None, missing_hint: str = "") -> Iterator[Row]:
    """Rows ``offset`` to ``offset + limit`` of a local file or a Hugging Face dataset.

    ``name`` is what messages call the source (default: ``source`` itself). A JSONL line that is
    not JSON goes to ``on_bad_line(where)`` and is skipped, or without it is a one-line error;
    either way it counts as a row for ``offset`` and ``limit``. ``split``, ``subset`` and
    ``data_dir`` are for hub datasets; a local file has only its ``train`` split. A name that is no
    file and does not look like a path is a hub dataset id unless ``format`` names a file format;
    ``missing_hint`` (``"; pass ..."``) ends the message for a file that is not there.
    """
    if format not in FORMATS:
        raise DataError(f"{source}: unknown format {format!r}; use one of {', '.join(FORMATS)}")
    spec = str(source)
    name = spec if name is None else name
    if format in ("auto", "hub") and is_hub_id(spec):
        yield from _hub_rows(spec, name, split, subset, data_dir, offset, limit)
        return
    file = Path(spec).expanduser()
    if not file.exists():
        raise DataError(f"{name}: file not found{missing_hint}")
    fmt = file_format(file, format, name)
    if fmt == "hub":
        raise DataError(f"{name}: format 'hub' needs a hub dataset id, not a file")
    if fmt in ARROW_FORMATS:
        yield from _arrow_rows(file, fmt, name, offset, limit)
        return
    rows = _json_rows(file, name) if fmt == "json" else _lines(file, fmt, name)
    window = islice(rows, offset, None if limit is None else offset + limit)
    yield from _parse_jsonl(window, on_bad_line) if fmt == "jsonl" else window


# -- read here, line by line ---------------------------------------------------------------------------
def _lines(file: Path, fmt: str, name: str) -> Iterator[Row]:
    """Text rows, or JSONL lines still unparsed (a blank line is no row), numbered by line."""
    try:
        with file.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if fmt == "text":
                    yield Row(n, f"{name}:{n}", {"prompt": line.rstrip("\n")})
                elif line.strip():
                    yield Row(n, f"{name}:{n}", line)
    except UnicodeDecodeError:
        raise DataError(f"{name}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{name}: cannot be read ({first_line(exc)})") from None


def _parse_jsonl(lines: Iterator[Row], on_bad_line: Callable[[str], None] | None) -> Iterator[Row]:
    """Parsed after the offset/limit window is cut: lines before ``offset`` are not parsed, so not
    reported, while a bad line inside the window still counts towards ``limit`` as the row it is."""
    for row in lines:
        try:
            data = json.loads(row.data)
        except json.JSONDecodeError as exc:
            if on_bad_line is None:
                raise DataError(f"{row.where}: not valid JSON ({exc.msg}); fix or delete that line") from None
            on_bad_line(row.where)
            continue
        yield row._replace(data=data)


def _json_rows(file: Path, name: str) -> Iterator[Row]:
    """A JSON list of records; an object stands for the first list it holds, or for itself."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{name}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    except OSError as exc:
        raise DataError(f"{name}: cannot be read ({first_line(exc)})") from None
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of records")
    for n, row in enumerate(data, 1):
        yield Row(n, f"{name}:{n}", row)


# -- read by datasets ----------------------------------------------------------------------------------
def _split(split: str, offset: int, limit: int | None) -> tuple[str, bool]:
    """``(split to load, whether offset/limit are still to apply)``: a slice of a plain split name,
    or the user's own slice (``train[:10%]``) loaded as given and windowed afterwards."""
    if not offset and limit is None:
        return split, False
    if "[" in split:
        return split, True
    return f"{split}[{offset}:{'' if limit is None else offset + limit}]", False


def _load(path: str, split: str, offset: int, limit: int | None, **kwargs: Any) -> Any:
    """The rows of the window, as a dataset; a window past the end is empty, not an error."""
    import datasets
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    spec, window = _split(split, offset, limit)
    try:
        ds = datasets.load_dataset(path, split=spec, **kwargs)
    except ValueError as exc:
        if "corresponds to no data" not in str(exc):
            raise
        return []
    if window:
        ds = ds.select(range(min(offset, len(ds)), len(ds) if limit is None else min(len(ds), offset + limit)))
    return ds


def _arrow_rows(file: Path, fmt: str, name: str, offset: int, limit: int | None) -> Iterator[Row]:
    extra = {"keep_default_na": False} if fmt == "csv" else {}
    first = 2 if fmt == "csv" else 1  # a CSV's row 0 is on line 2, under the header
    try:
        with tempfile.TemporaryDirectory(prefix="cai-datasets-") as cache:  # nothing cached outlives the read
            ds = _load(fmt, "train", offset, limit, data_files=str(file.resolve()), cache_dir=cache,
                       keep_in_memory=True, **extra)
    except Exception as exc:  # pandas and arrow raise many types; the user needs one line
        raise DataError(f"{name}: cannot be read as {fmt} ({first_line(exc.__cause__ or exc)})") from None
    for i, row in enumerate(ds, offset):
        yield Row(i + first, f"{name}:{i + first}", row)


def _hub_rows(path: str, name: str, split: str, subset: str | None, data_dir: str | None, offset: int,
              limit: int | None) -> Iterator[Row]:
    reason = None if _hub_dataset_cached(path) else hub_offline_reason(
        offline_vars=("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if reason:
        raise DataError(f"{path}: not a local file, and the Hugging Face dataset cannot be downloaded "
                        f"({reason}); download it where there is network access or pass a local file")
    kwargs: dict[str, Any] = {}
    if subset:
        kwargs["name"] = subset
    if data_dir:
        kwargs["data_dir"] = data_dir
    try:
        with quiet_hub_logs():
            ds = _load(path, split, offset, limit, **kwargs)
    except Exception as exc:
        raise DataError(f"{path}: not a local file and cannot be loaded as a Hugging Face dataset "
                        f"({first_line(exc)}); download it where there is network or pass a local file") from None
    for i, row in enumerate(ds, offset):
        yield Row(i + 1, f"{name}[{split}]:{i}", row)


def _hub_dataset_cached(name: str) -> bool:
    """Whether ``datasets`` has this id in its local cache (so no network is needed)."""
    try:
        from datasets import config as ds_config

        cache = Path(ds_config.HF_DATASETS_CACHE)
    except Exception:
        return False
    return any(cache.glob(name.replace("/", "___") + "*"))


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes, read in chunks (input files can be gigabytes)."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def local_input_digests(specs: dict[str, Any]) -> dict[str, str]:
    """Content hashes of the user's own input files among ``{field: value}``: a path, a list of
    paths, or preference sources (objects with ``.path``). ``embedded:`` samples (versioned with the
    package), ``run:`` names (made by an upstream stage, whose identity covers them) and hub ids
    (no local content) are left out. A file edited in place then changes its stage's identity."""
    out: dict[str, str] = {}
    for field, value in specs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for n, item in enumerate(values):
            path = getattr(item, "path", item)
            if not isinstance(path, str) or path.startswith(("embedded:", "run:")) or not path:
                continue
            file = Path(path).expanduser()
            if file.is_file():
                out[f"{field}[{n}]" if isinstance(value, (list, tuple)) else field] = file_digest(file)
    return out
