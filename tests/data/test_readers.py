"""Each file format reads back exactly the rows that were written (the writer is the oracle)."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from rlcpm.data.readers import detect_format, read_rows
from rlcpm.errors import DataError

ROWS = [
    {"id": "a", "prompt": "What is 2+3?", "answer": "5"},
    {"id": "b", "prompt": "What is 7-4?", "answer": "3"},
    {"id": "c", "prompt": "What is 6*2?", "answer": "12"},
]


def _data(path, **kwargs):
    return [row.data for row in read_rows(path, **kwargs)]


def test_jsonl_rows_and_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]) + "\n")
    rows = list(read_rows(path))
    assert [r.data for r in rows] == ROWS
    assert [r.number for r in rows] == [1, 3, 4]  # blank line 2 skipped, numbering keeps file lines
    assert rows[1].location == "line 3" and rows[1].source == str(path) and rows[1].name == "train.jsonl"


def test_jsonl_gzip_and_bad_line_is_reported_not_raised(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps(ROWS[0]) + "\n{not json\n" + json.dumps(ROWS[1]) + "\n")
    rows = list(read_rows(path))
    assert [r.data for r in rows] == [ROWS[0], None, ROWS[1]]
    assert rows[1].number == 2 and "not valid JSON" in rows[1].parse_error


@pytest.mark.parametrize("name", ["train.jsonl", "train.json"])
def test_an_unpaired_surrogate_escape_is_a_bad_row_not_a_crash_later(tmp_path, name):
    """Valid JSON (a cut emoji, "\\ud83d"), but no text: tokenizers raised a TypeError on it."""
    path = tmp_path / name
    lines = [json.dumps(ROWS[0]), '{"prompt": "cut \\ud83d emoji"}', '{"prompt": "whole \\ud83d\\ude00"}']
    path.write_text("\n".join(lines) + "\n" if name.endswith("l") else "[" + ", ".join(lines) + "]")
    rows = list(read_rows(path))
    assert [r.data for r in rows] == [ROWS[0], None, {"prompt": "whole \U0001f600"}]
    assert "unpaired surrogate \\ud83d" in rows[1].parse_error


@pytest.mark.parametrize("wrap", [False, True], ids=["list", "data-key"])
def test_json_list_or_data_key(tmp_path, wrap):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data": ROWS} if wrap else ROWS))
    rows = list(read_rows(path))
    assert [r.data for r in rows] == ROWS and rows[2].location == "row 3"


def test_a_one_row_json_lines_file_saved_as_json_is_one_row(tmp_path):
    """datasets' to_json writes JSON Lines, so a one-row dataset is one object on one line."""
    path = tmp_path / "one.json"
    path.write_text(json.dumps(ROWS[0]) + "\n")
    assert [r.data for r in read_rows(path)] == ROWS[:1]


def test_json_file_that_is_not_a_dataset_fails_with_path(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"rows": []}')
    with pytest.raises(DataError, match="bad.json.*list of objects"):
        list(read_rows(path))
    path.write_text("[{]")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        list(read_rows(path))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert _data(path) == ROWS


def test_nested_objects_from_arrow_lose_the_null_keys_of_other_rows(tmp_path):
    """Arrow gives a struct column the union of its rows' keys; a tool schema or a call's
    arguments must read back without every other row's keys as nulls."""
    from datasets import Dataset

    rows = [
        {"prompt": "Weather?", "expected_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]},
        {"prompt": "Timer?", "expected_calls": [{"name": "timer", "arguments": {"minutes": 5}}]},
    ]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "calls.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert _data(tmp_path / "calls.parquet") == rows
    assert _data(tmp_path / "saved") == rows


def test_csv_rows_line_numbers_and_extra_cells(tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "prompt", "answer"])
        for row in ROWS:
            writer.writerow([row["id"], row["prompt"], row["answer"]])
        writer.writerow(["d", "What is 1+1?", "2", "surplus"])
    rows = list(read_rows(path))
    assert [r.data for r in rows[:3]] == ROWS
    assert [r.number for r in rows] == [2, 3, 4, 5]  # the header is line 1
    assert rows[3].data is None and "1 more cell(s) than the header's 3" in rows[3].parse_error


def test_a_csv_cell_over_the_csv_modules_default_limit_reads_back(tmp_path):
    path = tmp_path / "long.csv"
    long_prompt = "word " * 40_000  # 200,000 characters; the csv module refuses > 131,072 by default
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([["prompt", "answer"], [long_prompt, "1"]])
    assert _data(path) == [{"prompt": long_prompt, "answer": "1"}]


def test_saved_dataset_and_dataset_dict_split_choice(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert _data(tmp_path / "single") == ROWS

    DatasetDict(
        {"train": Dataset.from_list(ROWS[:2]), "validation": Dataset.from_list(ROWS[2:])}
    ).save_to_disk(str(tmp_path / "both"))
    assert _data(tmp_path / "both", split="train") == ROWS[:2]
    assert _data(tmp_path / "both", split="eval") == ROWS[2:]  # "validation" is an eval alias
    rows = list(read_rows(tmp_path / "both", split="eval"))
    assert rows[0].location == "row 1 of split 'validation'"

    DatasetDict({"a": Dataset.from_list(ROWS), "b": Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "ab")
    )
    with pytest.raises(DataError, match=r"splits \['a', 'b'\]"):
        _data(tmp_path / "ab")


def test_directory_of_mixed_files_in_sorted_order(tmp_path):
    from datasets import Dataset

    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    (root / "1.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (root / "2.json").write_text(json.dumps([ROWS[1]]))
    Dataset.from_list([ROWS[2]]).save_to_disk(str(root / "sub" / "saved"))
    (root / "README.md").write_text("not data")
    (root / ".hidden.jsonl").write_text("garbage\n")
    rows = list(read_rows(root))
    assert [r.data for r in rows] == ROWS
    assert [r.name for r in rows] == ["1.jsonl", "2.json", "sub/saved"]
    # an explicit format keeps only files of that format
    assert _data(root, fmt="jsonl") == [ROWS[0]]


def test_explicit_format_overrides_extension(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    with pytest.raises(DataError, match="rows.txt: cannot tell the format.*data.format"):
        _data(path)
    assert _data(path, fmt="jsonl") == ROWS


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match="dataset path not found: .*nowhere.jsonl"):
        _data(tmp_path / "nowhere.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: directory holds no data files"):
        _data(tmp_path / "empty")


@pytest.mark.parametrize("name", ["train.jsonl", "train.csv", "train.json"])
def test_a_text_file_that_is_not_utf8_fails_with_its_path(tmp_path, name):
    path = tmp_path / name
    header = {"train.jsonl": b"", "train.csv": b"prompt,answer\n", "train.json": b"["}[name]
    row = {"train.jsonl": b'{"prompt": "ok", "answer": "1"}\n', "train.csv": b"ok,1\n", "train.json": b""}[name]
    path.write_bytes(header + row + "Café?".encode("latin-1") + b"\n")  # Latin-1, as older tools save
    with pytest.raises(DataError, match=f"{name}: not UTF-8 text.*save the file as UTF-8"):
        _data(path)


def test_detect_format():
    from pathlib import Path

    assert detect_format(Path("a/b.JSONL")) == "jsonl"
    assert detect_format(Path("x.csv.gz")) == "csv"
    assert detect_format(Path("x.parquet.gz")) is None
    assert detect_format(Path("x.tar")) is None
