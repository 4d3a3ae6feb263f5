"""The `pretune` command line; `main` is the entry point (`pretune.cli:main`)."""

from __future__ import annotations

import importlib
import sys

from ..errors import PretuneError
from .parser import _doc_args, call_verb
from .verbs import VERBS


def _close_progress_bars() -> None:
    """An error raised under an open tqdm bar would print on the bar's line: end the bars first."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", None) or ()):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pretune <command> [options]   (pretune <command> --help for its options)\n")
        for v, target in VERBS.items():
            mod, name = target.split(":")
            try:
                summary = _doc_args(getattr(importlib.import_module(mod), name))[0]
            except Exception:  # a verb whose optional dependency is missing still lists
                summary = ""
            print(f"  {v:<10} {summary}")
        return 0
    try:
        call_verb(argv[0], argv[1:])
    except PretuneError as e:
        _close_progress_bars()
        import os
        if not (getattr(e, "collective", False) and os.environ.get("RANK", "0") != "0"):  # every rank has it: one line
            print(f"pretune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pretune: interrupted", file=sys.stderr)
        return 130
    return 0
