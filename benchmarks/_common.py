"""Shared command-line plumbing of the benchmark scripts (the benchmarks live in pretune_bench)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runnable from a checkout


def parser(description: str, rounds: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--rounds", type=int, default=rounds, help="A/B rounds after the warm-up (order flips each round)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each side first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, the same for both sides (default: torch's)")
    ap.add_argument("--json", default=None, help="write the results to this file ('-': print them)")
    return ap


def report(results: list[dict], json_path: str | None) -> None:
    from pretune_bench import harness

    if json_path == "-":
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(harness.describe(r))
    if json_path:
        from pretune.fileio import atomic_write_json
        atomic_write_json(json_path, results)
        print(f"results in {json_path}")
