"""Where rows come from: local files, ``datasets`` directories, the hub, or the bundled demo data.

A *source* is a string:

* a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file;
* a directory written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``, read at ``split``);
* ``bundled:<name>``, a file shipped in ``rlhf_lightning/data/bundled`` (see its ``manifest.json``);
* otherwise a Hugging Face hub dataset id, read at ``split`` (needs a network).

Every row comes back with a location such as ``"train.jsonl row 17"`` so errors can name it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from lightning.pytorch.utilities import rank_zero_warn

from rlhf_lightning.data.formats import FIELDS_READ, SkipRow
from rlhf_lightning.errors import DataFormatError, DataSourceError

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED_PREFIX = "bundled:"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

Row = TypeVar("Row")


def bundled_path(name: str) -> Path:
    """The file behind ``bundled:<name>``."""
    path = BUNDLED_DIR / f"{name}.jsonl"
    if not path.exists():
        available = sorted(p.stem for p in BUNDLED_DIR.glob("*.jsonl"))
        raise DataSourceError(f"unknown bundled dataset 'bundled:{name}'; available: {available}")
    return path


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Excel's CSVs) is not part of the data
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataSourceError(
            f"{path} line {line}: not valid UTF-8 (byte {data[err.start]:#04x} at offset {err.start})"
        ) from err


def _jsonl(path: Path) -> Iterator[tuple[Any, str]]:
    # split on "\n" only: str.splitlines() would also break inside strings at U+2028/U+2029/U+0085
    for number, line in enumerate(_decode(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line), f"{path.name} row {number}"
        except json.JSONDecodeError as err:
            raise DataSourceError(
                f"{path} row {number}: invalid JSON ({err.msg} at column {err.colno})"
            ) from err


def _json(path: Path) -> Iterator[tuple[Any, str]]:
    try:
        data = json.loads(_decode(path))
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from err
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataSourceError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
    for number, record in enumerate(data, start=1):
        yield record, f"{path.name} row {number}"


def _csv(path: Path) -> Iterator[tuple[Any, str]]:
    reader = csv.DictReader(io.StringIO(_decode(path)))
    for number, record in enumerate(reader, start=1):
        yield dict(record), f"{path.name} row {number}"


def _parquet(path: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataSourceError(f"{path}: cannot read as parquet ({err})") from err
    for number, record in enumerate(table.to_pylist(), start=1):
        yield record, f"{path.name} row {number}"


def _dataset_rows(dataset, label: str) -> Iterator[tuple[Any, str]]:
    for number, record in enumerate(dataset, start=1):
        yield dict(record), f"{label} row {number}"


def _from_disk(path: Path, split: str) -> Iterator[tuple[Any, str]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataSourceError(f"{path}: no split {split!r}; it has {sorted(loaded)}")
        loaded = loaded[split]
    return _dataset_rows(loaded, f"{path.name}[{split}]")


def _from_hub(name: str, split: str) -> Iterator[tuple[Any, str]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, missing repo, missing split: all are the user's to act on
        raise DataSourceError(
            f"cannot read dataset {name!r} (split {split!r}): it is not a local file or directory, and the hub "
            f"could not provide it ({type(err).__name__}: {err}). Expected a {'/'.join(FILE_SUFFIXES)} file, "
            f"a datasets directory, 'bundled:<name>' or a reachable hub id."
        ) from err
    return _dataset_rows(dataset, f"{name}[{split}]")


def read_records(source: str, split: str = "train") -> list[tuple[Any, str]]:
    """All raw records of a source with their locations; raises :class:`DataSourceError` if unreadable."""
    if not isinstance(source, str) or not source.strip():
        raise DataSourceError(f"a data source must be a non-empty string, got {source!r}")
    if source.startswith(BUNDLED_PREFIX):
        path = bundled_path(source[len(BUNDLED_PREFIX) :])
    else:
        path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            records = list(_from_disk(path, split))
        else:
            raise DataSourceError(
                f"{path} is a directory but not a saved `datasets` dataset (no dataset_info.json)"
            )
    elif path.exists():
        readers: dict[str, Callable[[Path], Iterator]] = {
            ".jsonl": _jsonl,
            ".json": _json,
            ".csv": _csv,
            ".parquet": _parquet,
        }
        if path.suffix not in readers:
            raise DataSourceError(
                f"{path}: unknown file type {path.suffix!r}; expected one of {FILE_SUFFIXES}"
            )
        records = list(readers[path.suffix](path))
    elif path.suffix in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataSourceError(f"data file {source!r} does not exist")
    else:
        records = list(_from_hub(source, split))
    if not records:
        raise DataSourceError(f"{source}: no rows")
    return records


def read_rows(
    source: str, parse: Callable[[Any, str], Row], split: str = "train"
) -> tuple[list[Row], dict[str, int]]:
    """Parse every record of ``source``; returns the rows and the count of skipped rows by reason.

    Columns the parser does not read (metadata such as ``id`` or ``source``) are named once, in one
    warning per source.
    """
    rows: list[Row] = []
    skipped: dict[str, int] = {}
    reads = FIELDS_READ.get(parse)
    ignored: set[str] = set()
    for record, where in read_records(source, split):
        if reads is not None and isinstance(record, dict):
            ignored.update(k for k in record if k not in reads)
        try:
            rows.append(parse(record, where))
        except SkipRow as skip:
            skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
    if ignored:
        rank_zero_warn(
            f"{source}: ignored column(s) {', '.join(sorted(map(repr, ignored)))} "
            f"(a {parse.__name__.removeprefix('to_').removesuffix('_row')} row is read from: {', '.join(sorted(reads))})"
        )
    if not rows:
        raise DataFormatError(f"{source}: every row was skipped ({skipped}); nothing to train on")
    return rows, skipped
