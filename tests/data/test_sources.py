"""Every local source kind reads the same records; unreadable sources fail with the file and line."""

from __future__ import annotations

import csv
import json
import re

import pytest

from rlhf_lightning.data.formats import DataFormatError, to_preference_row, to_sft_row
from rlhf_lightning.data.sources import DataSourceError, read_records, read_rows

ROWS = [
    {"prompt": "Say apple", "completion": "apple"},
    {"prompt": "Say pear", "completion": "pear, naïvely"},
    {"prompt": "Say plum", "completion": "plum\nplum"},
]
NESTED = [
    {
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "hello"}],
    },
    {
        "prompt": [{"role": "user", "content": "bye"}],
        "completion": [{"role": "assistant", "content": "ciao"}],
    },
]


def _write(kind: str, rows: list[dict], directory):
    if kind == "jsonl":
        path = directory / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path = directory / "rows.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif kind == "json-data":
        path = directory / "wrapped.json"
        path.write_text(json.dumps({"data": rows, "version": 1}), encoding="utf-8")
    elif kind == "csv":
        path = directory / "rows.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "dataset":
        import datasets

        path = directory / "rows_ds"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "datasetdict":
        import datasets

        path = directory / "rows_dd"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    else:
        raise AssertionError(kind)
    return path


ALL_KINDS = ["jsonl", "json", "json-data", "csv", "parquet", "dataset", "datasetdict"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_source_kind_reads_the_same_records(kind, tmp_path):
    path = _write(kind, ROWS, tmp_path)
    records = read_records(str(path))
    assert [r for r, _ in records] == ROWS
    wheres = [w for _, w in records]
    assert len(set(wheres)) == len(ROWS)
    assert all(path.name in w for w in wheres)
    assert wheres[-1].endswith("row 3")


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "dataset"])
def test_nested_message_lists_survive_every_structured_kind(kind, tmp_path):
    path = _write(kind, NESTED, tmp_path)
    records = [r for r, _ in read_records(str(path))]
    assert records == NESTED
    rows, skipped = read_rows(str(path), to_sft_row)
    assert skipped == {}
    assert rows[1].prompt == [{"role": "user", "content": "bye"}]
    assert rows[1].completion == "ciao"


def test_jsonl_locations_count_lines_including_blank_ones(write_jsonl):
    path = write_jsonl([ROWS[0]])
    path.write_text(path.read_text() + "\n   \n" + json.dumps(ROWS[1]) + "\n")
    records = read_records(str(path))
    assert [w for _, w in records] == ["data.jsonl row 1", "data.jsonl row 4"]


def test_datasetdict_split_is_chosen_and_missing_split_named(tmp_path):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:2]), "test": datasets.Dataset.from_list(ROWS[2:])}
    ).save_to_disk(str(path))
    assert [r for r, _ in read_records(str(path), split="test")] == ROWS[2:]
    assert [r for r, _ in read_records(str(path), split="train")] == ROWS[:2]
    with pytest.raises(DataSourceError, match=r"no split 'validation'; it has \['test', 'train'\]"):
        read_records(str(path), split="validation")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataSourceError, match=f"data file '{re.escape(str(missing))}' does not exist"):
        read_records(str(missing))


def test_missing_relative_file():
    with pytest.raises(DataSourceError, match="does not exist"):
        read_records("./definitely/not/here.csv")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataSourceError, match=f"{re.escape(str(path))}: no rows"):
        read_records(str(path))


def test_empty_csv_and_json_list(tmp_path):
    header_only = tmp_path / "h.csv"
    header_only.write_text("prompt,completion\n")
    with pytest.raises(DataSourceError, match="no rows"):
        read_records(str(header_only))
    empty_list = tmp_path / "e.json"
    empty_list.write_text("[]")
    with pytest.raises(DataSourceError, match="no rows"):
        read_records(str(empty_list))


def test_invalid_json_line_names_file_and_row(write_jsonl):
    path = write_jsonl(ROWS[:2])
    path.write_text(path.read_text() + '{"prompt": "x", "completion": \n' + json.dumps(ROWS[2]) + "\n")
    with pytest.raises(DataSourceError, match=rf"^{re.escape(str(path))} row 3: invalid JSON"):
        read_records(str(path))


def test_invalid_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"a": 1},\n {"a": ]')
    with pytest.raises(DataSourceError, match=rf"^{re.escape(str(path))}: invalid JSON .* at line 2"):
        read_records(str(path))
    not_a_list = tmp_path / "obj.json"
    not_a_list.write_text('{"rows": []}')
    with pytest.raises(DataSourceError, match="expected a JSON list of rows"):
        read_records(str(not_a_list))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_non_utf8_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    good = json.dumps(ROWS[0]).encode() + b"\n"
    path.write_bytes(good + good + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(
        DataSourceError, match=rf"^{re.escape(str(path))} line 3: not valid UTF-8 \(byte 0xe9"
    ):
        read_records(str(path))


def test_unknown_suffix(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("prompt,completion\na,b\n")
    with pytest.raises(DataSourceError, match=r"unknown file type '\.txt'"):
        read_records(str(path))


def test_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataSourceError, match="not a saved `datasets` dataset"):
        read_records(str(tmp_path))


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataSourceError, match=f"{re.escape(str(path))}: cannot read as parquet"):
        read_records(str(path))


@pytest.mark.parametrize("source", ["", "   ", None])
def test_source_must_be_a_non_empty_string(source):
    with pytest.raises(DataSourceError, match="non-empty string"):
        read_records(source)


def test_unknown_bundled_dataset():
    with pytest.raises(DataSourceError, match="unknown bundled dataset 'bundled:no_such_set'"):
        read_records("bundled:no_such_set")


def test_read_rows_counts_skips(write_jsonl):
    path = write_jsonl(
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "q", "responses": ["x", "y", "x"]},
            {"prompt": "r", "responses": ["x", "y", "z"], "ranks": [2, 3, 1]},
        ]
    )
    rows, skipped = read_rows(str(path), to_preference_row)
    assert skipped == {"identical responses": 2}
    assert [r.responses for r in rows] == [["a", "b"], ["z", "x", "y"]]


def test_read_rows_all_skipped(write_jsonl):
    path = write_jsonl([{"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataFormatError, match=r"every row was skipped \(\{'identical responses': 1\}\)"):
        read_rows(str(path), to_preference_row)


def test_read_rows_format_error_names_file_row_and_field(write_jsonl):
    path = write_jsonl([ROWS[0], {"prompt": "x", "completion": 5}])
    with pytest.raises(DataFormatError, match=r"^data\.jsonl row 2: field 'completion'"):
        read_rows(str(path), to_sft_row)


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    rows = [{"prompt": "a\u2028b", "completion": "c\u0085d\u2029"}, ROWS[0]]
    path = tmp_path / "unicode.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    records = read_records(str(path))
    assert [r for r, _ in records] == rows
    assert [w for _, w in records] == ["unicode.jsonl row 1", "unicode.jsonl row 2"]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_utf8_byte_order_mark_is_ignored(tmp_path, kind):
    path = _write(kind, ROWS, tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [r for r, _ in read_records(str(path))] == ROWS
