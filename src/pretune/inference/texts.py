"""Texts given on the command line: the one reader of `@FILE` and `-` for every verb that takes texts.

It is argument parsing, but lives here, not in cli/: the verbs that read texts (embed, classify) are
in this layer, and a module never imports the layer above it (docs/architecture.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import PretuneError

TABLES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")


def read_texts(args: list[str], what: str, columns: str | None = None) -> list:
    """Each argument a text as given; "@FILE" the non-blank lines of FILE; "-" those of stdin.
    With `columns` (classify: the task's text column(s)) a .csv/.tsv/.jsonl FILE is read as a table,
    giving (text, second text or None) pairs. No text at all is an error naming `what`."""
    from ..data.labelled import read_labelled_file

    out: list = []
    for s in args:
        if s == "-":
            out += [ln for ln in sys.stdin.read().splitlines() if ln.strip()]
        elif s.startswith("@") and len(s) > 1:
            p = Path(s[1:])
            if columns is not None and p.suffix.lower() in TABLES:
                out += [(a, b) for a, b, _ in read_labelled_file(p, columns, None)]
                continue
            try:
                out += [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except OSError as e:
                raise PretuneError(f"cannot read the texts file: {e.strerror}", str(p),
                                   "give @FILE with one text per line") from e
        else:
            out.append(s)
    if not out:
        raise PretuneError(f"no texts to {what}", None, 'give texts, "@FILE" (one per line) or "-" (stdin)')
    return out
