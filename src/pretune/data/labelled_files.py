"""Reading a user's labelled file (.csv, .tsv, .jsonl): rows of (text, text_b, label), every
malformed row named in one line (docs/errors.md). What the rows become is data/labelled.py's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import PretuneError


def _columns(spec) -> list[str]:
    cols = [c.strip() for c in (spec.split(",") if isinstance(spec, str) else spec) if c.strip()]
    if not 1 <= len(cols) <= 2:
        raise PretuneError(f"--text-column names {len(cols)} columns", None,
                           "name one text column, or two (comma-separated) for text pairs")
    return cols


def read_labelled_file(path: str | Path, text_column="text", label_column: str | None = "label",
                       kind: str = "single", split_column: str | None = None) -> list[tuple]:
    """(text, text_b, label) rows of a .csv / .tsv / .jsonl file; label None if label_column is None.
    `kind` regression also takes JSON numbers, multi JSON lists (joined "a|b"). With `split_column`
    each row has a fourth item, its split. Rows are numbered from 1 (after the header) in error messages."""
    path = Path(path)
    cols = _columns(text_column)
    if not path.is_file():
        raise PretuneError("no such file", str(path), "give a .csv, .tsv or .jsonl file, or a built-in task name")
    suffix = path.suffix.lower()
    records: list[dict] = []
    numbers: list[str] = []  # what a message calls each record: "row i" (csv), "line n" (jsonl)
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8", newline="") as f:
                r = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                header = list(r.fieldnames or [])
                records = list(r)
                numbers = [f"row {i}" for i in range(1, len(records) + 1)]
        elif suffix in (".jsonl", ".ndjson", ".json"):
            header = None
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        raise PretuneError(f"line {i} is not valid JSON ({e.msg})", str(path),
                                           "write one JSON object per line")
                    if not isinstance(obj, dict):
                        raise PretuneError(f"line {i} is not a JSON object", str(path),
                                           'write one object per line, e.g. {"text": ..., "label": ...}')
                    records.append(obj)
                    numbers.append(f"line {i}")
        else:
            raise PretuneError(f"unknown file type '{suffix}'", str(path), "use .csv, .tsv or .jsonl")
    except UnicodeDecodeError as e:
        raise PretuneError(f"the file is not UTF-8 ({e.reason} at byte {e.start})", str(path),
                           "save it as UTF-8")
    if not records:
        raise PretuneError("the file holds no rows", str(path), "give a file with a header and labelled rows")
    present = header if header is not None else sorted({k for r in records for k in r})
    for c in cols + ([label_column] if label_column else []) + ([split_column] if split_column else []):
        if c not in present:
            which = "label" if c == label_column else "split" if c == split_column else "text"
            opt = "--finetune.split-column" if which == "split" else f"--{which}-column"
            raise PretuneError(f"no {which} column '{c}' (columns: {', '.join(map(str, present))})", str(path),
                               f"name the right one with {opt}")
    out = []
    for at, r in zip(numbers, records):
        texts = []
        for c in cols:
            v = r.get(c)
            if v is not None and not isinstance(v, str):  # JSON: an object, list, number or boolean
                raise PretuneError(f"{at} has a non-string text in column '{c}' ({_json_kind(v)})", str(path),
                                   'write the text as a JSON string, e.g. "text": "a fine film"')
            if v is None or not v.strip():
                raise PretuneError(f"{at} has an empty text in column '{c}'", str(path),
                                   "fill it in or remove the row")
            texts.append(v.strip())
        label = None
        if label_column:
            v = r.get(label_column)
            if v is None or (isinstance(v, str) and not v.strip()):
                raise PretuneError(f"{at} has no label in column '{label_column}'", str(path),
                                   "fill it in or remove the row")
            if kind == "regression" and isinstance(v, float):
                v = repr(v)
            elif kind == "multi" and isinstance(v, list) and v and all(isinstance(x, (str, int)) and
                                                                      not isinstance(x, bool) for x in v):
                v = "|".join(str(x).strip() for x in v)
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                # stringified, {"y": 1}, [1], true or 1.0 would each become a class of its own
                raise PretuneError(f"{at} has {_json_kind(v)} as its label in column '{label_column}' "
                                   f"({json.dumps(v)[:40]})", str(path),
                                   'write each label as a string or an integer, e.g. "positive" or 1')
            label = str(v).strip()
        row = (texts[0], texts[1] if len(texts) == 2 else None, label)
        if split_column:
            row += (str(r.get(split_column) or "").strip().lower(),)
        out.append(row)
    return out


def _json_kind(v) -> str:
    """How a message names a JSON value that is not a string."""
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, float):
        return "a float"
    return "an integer" if isinstance(v, int) else type(v).__name__


