"""Read dataset rows from local files: JSONL, JSON, Parquet, CSV, and `datasets` saved with save_to_disk.

A source is a file or a directory. A directory written by `Dataset.save_to_disk` /
`DatasetDict.save_to_disk` is read with `datasets.load_from_disk`; any other directory is read
as the sorted list of the data files below it. With `format: auto` each file's format comes
from its extension (`.gz` allowed for JSONL, JSON and CSV).

Readers yield `RawRow`s and never judge a row's content; a row that cannot even be parsed (a
bad JSON line) carries `parse_error`, so the loader can fail or skip it like any other bad row.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlcpm.errors import DataError

SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")
EVAL_SPLIT_NAMES = ("eval", "validation", "valid", "test", "dev")
MAX_CSV_CELL_CHARS = 2**31 - 1
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate, paired or not


@dataclass(frozen=True)
class RawRow:
    """One row as read: `data` is whatever the file held there (normally a dict of columns).

    `source` is the file's path (for messages), `name` its path relative to the directory the
    user gave (for row ids), `location` says where in it ("line 7", "row 3"), and `number` is
    the 1-based line (JSONL, CSV) or row number.
    """

    source: str
    name: str
    location: str
    number: int
    data: Any = None
    parse_error: str | None = None


_Located = tuple[str, int, Any, str | None]  # (location, number, data, parse_error)


def detect_format(path: Path) -> str | None:
    """The format named by a file's extension (`x.jsonl.gz` -> "jsonl"), or None if unknown."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        fmt = SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None
        return fmt if fmt in ("jsonl", "json", "csv") else None
    return SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None


def is_saved_dataset(path: Path) -> bool:
    """True for a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS)


def read_rows(path: str | Path, fmt: str = "auto", split: str = "train") -> Iterator[RawRow]:
    """Every row of a file or directory, in order. `split` picks the split of a DatasetDict.

    Raises DataError when the path does not exist, holds no data files, or a whole file is
    unreadable (a JSON file that does not parse, a Parquet file that is not Parquet, a text
    file that is not UTF-8).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"dataset path not found: {root}")
    for file, file_fmt in _resolve_sources(root, fmt):
        name = str(file.relative_to(root)) if file != root else file.name
        rows = (
            _read_saved_dataset(file, split)
            if file_fmt == "arrow" and file.is_dir()
            else _READERS[file_fmt](file)
        )
        location = None
        try:
            for row in rows:
                location = row[0]
                yield RawRow(str(file), name, *row)
        except UnicodeDecodeError as err:
            where = f" after {location}" if location else ""
            raise DataError(f"{file}: not UTF-8 text{where} ({err.reason}); save the file as UTF-8") from err


def _resolve_sources(root: Path, fmt: str) -> list[tuple[Path, str]]:
    """The (path, format) pairs to read: one file, one saved dataset, or a directory's files."""
    if root.is_file():
        file_fmt = detect_format(root) if fmt == "auto" else fmt
        if file_fmt is None:
            known = ", ".join(sorted(SUFFIX_FORMATS))
            raise DataError(
                f"{root}: cannot tell the format from the extension (known: {known}); set data.format"
            )
        return [(root, file_fmt)]
    if is_saved_dataset(root):
        return [(root, "arrow")]
    sources: list[tuple[Path, str]] = []
    _collect(root, fmt, sources)
    if not sources:
        wanted = "data files" if fmt == "auto" else f"{fmt} files"
        raise DataError(f"{root}: directory holds no {wanted} and is not a saved `datasets` directory")
    return sources


def _collect(directory: Path, fmt: str, out: list[tuple[Path, str]]) -> None:
    for child in sorted(directory.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            if is_saved_dataset(child):
                if fmt in ("auto", "arrow"):
                    out.append((child, "arrow"))
            else:
                _collect(child, fmt, out)
            continue
        file_fmt = detect_format(child)
        if file_fmt is not None and fmt in ("auto", file_fmt):
            out.append((child, file_fmt))


def _open_text(path: Path) -> io.TextIOBase:
    """UTF-8 text; a byte-order mark (Excel, Notepad) is dropped, not read as part of the first row."""
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _read_jsonl(path: Path) -> Iterator[_Located]:
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            location = f"line {line_number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                yield location, line_number, None, f"not valid JSON ({err.msg})"
                continue
            problem = _surrogate_problem(data) if SURROGATE_ESCAPE.search(line) else None
            yield location, line_number, None if problem else data, problem


def _read_json(path: Path) -> Iterator[_Located]:
    with _open_text(path) as handle:
        text = handle.read()
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines in a .json file, as datasets' to_json writes
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("data"), list):
        loaded = loaded["data"]
    elif _is_one_json_lines_row(loaded, text):
        loaded = [loaded]
    if not isinstance(loaded, list):
        raise DataError(f'{path}: a JSON dataset must be a list of objects or {{"data": [...]}}')
    check_surrogates = SURROGATE_ESCAPE.search(text) is not None
    for index, data in enumerate(loaded, start=1):
        problem = _surrogate_problem(data) if check_surrogates else None
        yield f"row {index}", index, None if problem else data, problem


def _surrogate_problem(data: Any) -> str | None:
    """What is wrong with a row whose JSON escapes leave half a surrogate pair (a cut emoji,
    "\\ud83d"): valid JSON, but not text a tokenizer can take."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        return f"not valid text: unpaired surrogate \\u{ord(err.object[err.start]):04x} (half of an escaped emoji?)"
    return None


def _is_one_json_lines_row(loaded: Any, text: str) -> bool:
    """`datasets`' to_json of a one-row dataset: one object on one line. An object whose values
    are all lists looks like a wrapper ({"rows": [...]}) instead, and stays an error."""
    return (
        isinstance(loaded, dict)
        and "\n" not in text.strip()
        and not all(isinstance(value, list) for value in loaded.values())
    )


def _read_csv(path: Path) -> Iterator[_Located]:
    # The csv module refuses cells over 128 KiB; a long prompt is data.max_prompt_tokens' call.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_CSV_CELL_CHARS))
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return
        line_number = reader.line_num + 1  # where the next record starts (one may span lines)
        for record in reader:
            location = f"line {line_number}"
            extra = record.pop(None, None)  # type: ignore[call-overload]
            if extra:
                problem = f"{len(extra)} more cell(s) than the header's {len(reader.fieldnames)}"
                yield location, line_number, None, problem
                line_number = reader.line_num + 1
                continue
            yield location, line_number, record, None
            line_number = reader.line_num + 1


def _read_parquet(path: Path) -> Iterator[_Located]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt or foreign file
        raise DataError(f"{path}: cannot read as Parquet ({err})") from err
    for index, data in enumerate(table.to_pylist(), start=1):
        yield f"row {index}", index, _arrow_row(data), None


def _read_arrow_file(path: Path) -> Iterator[_Located]:
    from datasets import Dataset

    try:
        dataset = Dataset.from_file(str(path))
    except Exception as err:
        raise DataError(f"{path}: cannot read as an Arrow dataset file ({err})") from err
    for index, data in enumerate(dataset, start=1):
        yield f"row {index}", index, _arrow_row(data), None


def _read_saved_dataset(path: Path, split: str) -> Iterator[_Located]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: cannot load the saved dataset ({err})") from err
    if isinstance(loaded, DatasetDict):
        split_name = choose_split(list(loaded.keys()), split, str(path))
        dataset: Dataset = loaded[split_name]
        where = f" of split {split_name!r}"
    else:
        dataset, where = loaded, ""
    for index, data in enumerate(dataset, start=1):
        yield f"row {index}{where}", index, _arrow_row(data), None


def _arrow_row(data: dict) -> dict:
    """A row of an Arrow table (Parquet, `datasets`) without the nulls Arrow adds to nested
    objects: a struct column holds the union of its rows' keys, so a tool schema or a call's
    arguments would otherwise carry every other row's keys as nulls."""
    return {column: _drop_null_keys(value) for column, value in data.items()}


def _drop_null_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _drop_null_keys(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_null_keys(item) for item in value]
    return value


def choose_split(available: list[str], split: str, where: str) -> str:
    """The split of a DatasetDict to read: `split` itself, an eval alias, or the only one there is."""
    wanted = (split,) if split == "train" else (split, *EVAL_SPLIT_NAMES)
    for candidate in wanted:
        if candidate in available:
            return candidate
    if len(available) == 1:
        return available[0]
    raise DataError(
        f"{where}: saved DatasetDict has splits {sorted(available)} and none is {' / '.join(wanted)}; "
        "save the split you want on its own and point data.train / data.eval at it"
    )


_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "arrow": _read_arrow_file,
}
