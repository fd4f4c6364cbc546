"""Input tables, one vocabulary for `bgjax data folder` and `bgjax generate --manifest`: a CSV with a
header row or a JSONL file of objects. Column names and JSON keys are case-insensitive, `image` is
`product`, `ref`/`ref_mask` are `reference`/`reference_mask`; an unknown column stops the file, an
unknown JSON key rejects its line, each with the closest known names. Line numbers are where a row
starts in the file (a quoted cell may span lines)."""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
from collections.abc import Iterator
from pathlib import Path

COLUMNS = ("product", "mask", "category", "reference", "reference_mask", "seed", "num_images")
ALIASES = {"image": "product", "ref": "reference", "reference_image": "reference", "ref_image": "reference",
           "ref_mask": "reference_mask"}


class TableError(ValueError):
    """The whole table is unusable (suffix, header); the message names the file."""


@dataclasses.dataclass(frozen=True)
class Row:
    line: int  # where the row starts, 1-based
    fields: dict[str, str]  # canonical column -> the stripped value; empty cells are absent
    raw: dict | str  # the row as written, for error reports
    error: str | None = None  # why the row is unusable


def _canonical(name: str) -> str:
    key = "_".join(str(name).strip().lower().replace("-", " ").split())
    return ALIASES.get(key, key)


def _unknown(kind: str, name: str, columns: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(_canonical(name), [*columns, *(a for a, c in ALIASES.items() if c in columns)],
                                      n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (known: {', '.join(columns)}; `image` = `product`)"


def _fields(pairs, columns: tuple[str, ...]) -> dict[str, str]:
    return {_canonical(k): str(v).strip() for k, v in pairs
            if _canonical(k) in columns and v is not None and str(v).strip()}


def read_table(path: Path, columns: tuple[str, ...] = COLUMNS,
               required: tuple[str, ...] = ("product", "category")) -> Iterator[Row]:
    """Rows of a .csv or .jsonl table restricted to `columns`; `required` columns must be in a CSV's header
    (a row without them is the caller's to reject). Raises TableError for a file it cannot read as a table."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise TableError(f"{path}: a table must be .csv or .jsonl")
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TableError(f"{path}: not UTF-8 text ({e})") from None
    yield from (_jsonl(text, columns) if suffix == ".jsonl" else _csv(path, text, columns, required))


def _jsonl(text: str, columns: tuple[str, ...]) -> Iterator[Row]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Row(number, {}, line, f"invalid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            yield Row(number, {}, line, "not a JSON object")
            continue
        unknown = [k for k in obj if _canonical(k) not in columns]
        error = "; ".join(_unknown("field", k, columns) for k in unknown) or None
        yield Row(number, _fields(obj.items(), columns), obj, error)


def _csv(path: Path, text: str, columns: tuple[str, ...], required: tuple[str, ...]) -> Iterator[Row]:
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise TableError(f"{path}:1: the header is not valid CSV ({e})") from None
    if not header:
        raise TableError(f"{path}: empty (expected a header row with {', '.join(required)})")
    names = [_canonical(h) for h in header]
    problems = [_unknown("column", h, columns) for h, n in zip(header, names, strict=True) if n not in columns]
    problems += [f"column {n!r} appears twice" for n in dict.fromkeys(names) if names.count(n) > 1]
    problems += [f"no {n!r} column" for n in required if n not in names]
    if problems:
        raise TableError(f"{path}:1: {'; '.join(problems)}")
    end = reader.line_num
    while True:
        start = end + 1
        try:
            cells = next(reader, None)
        except csv.Error as e:
            yield Row(start, {}, "", f"malformed CSV from here to line {reader.line_num} ({e}; an unclosed quote?)")
            return
        end = reader.line_num
        if cells is None:
            return
        if not cells:
            continue  # a blank line
        raw = dict(zip(header, cells, strict=False))
        error = f"{len(cells) - len(header)} cells more than the header has" if len(cells) > len(header) else None
        yield Row(start, _fields(zip(names, cells, strict=False), columns), raw, error)
