"""The sweep behind fine-tuning's defaults (docs/finetuning.md, "Defaults from measurements"):
test accuracy of an imported model on movie-sentiment over pooling x lr x epochs x batch size
(x max-len), 3 seeds, each (setting, seed) a `pretune finetune` subprocess, one thread.

    python -m pretune_bench.defaults --model minilm --train-examples 1000 --seeds 0,1,2 --out sweep.json

Settings run in the order seed 0 of every setting, then seed 1, ...: a sweep cut short still
covers every setting. Rows already in --out are kept and not rerun (a sweep can continue).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import subprocess
import sys
import tempfile
from pathlib import Path

from pretune_bench.lora import source_run

# name -> --finetune.* / --train.* settings; every swept option given explicitly, so that the rows do
# not depend on the defaults they are there to choose
ENCODER_GRID = {
    "bert-recipe cls": dict(pool="cls", lr=5e-5, epochs=3, batch=32),
    "bert-recipe mean": dict(pool="mean", lr=5e-5, epochs=3, batch=32),
    "mean lr1e-4 ep2 b16": dict(pool="mean", lr=1e-4, epochs=2, batch=16),
    "mean lr1e-4 ep3 b32": dict(pool="mean", lr=1e-4, epochs=3, batch=32),
    "mean lr2e-4 ep3 b32": dict(pool="mean", lr=2e-4, epochs=3, batch=32),
    "mean lr1e-4 ep3 b16": dict(pool="mean", lr=1e-4, epochs=3, batch=16),
    "mean lr2e-4 ep2 b16": dict(pool="mean", lr=2e-4, epochs=2, batch=16),
}
GRIDS = {"minilm": ENCODER_GRID}


def argv_for(s: dict) -> list[str]:
    a = ["--finetune.pool", s["pool"], "--train.lr", str(s["lr"]), "--finetune.epochs", str(s["epochs"]),
         "--train.batch-size", str(s["batch"])]
    if s.get("max_len"):
        a += ["--finetune.max-len", str(s["max_len"])]
    return a


def run_one(init: Path, out: Path, setting: dict, seed: int, train_examples: int) -> dict:
    cmd = [sys.executable, "-m", "pretune", "finetune", "--init", str(init), "--task", "movie-sentiment",
           "--out", str(out), "--train.seed", str(seed), "--train.device", "cpu", *argv_for(setting)]
    if train_examples:
        cmd += ["--finetune.train-examples", str(train_examples)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    res = json.loads((out / "results.json").read_text())
    return {"test_accuracy": res["test"]["accuracy"], "steps": res["steps"], "best_step": res["best_step"],
            "seconds": res["seconds"], "train_examples": res["train_examples"], "command": " ".join(cmd[1:])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(GRIDS), default="minilm")
    ap.add_argument("--train-examples", type=int, default=1000, help="0: all")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", default="", help="comma-separated names of the grid (default: all)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pretune-bench-lora")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    grid = GRIDS[a.model]
    names = [n for n in a.settings.split(",") if n] or list(grid)
    a.cache.mkdir(parents=True, exist_ok=True)
    init = source_run(a.model, a.cache)
    rows = json.loads(a.out.read_text()) if a.out.is_file() else []
    done = {(r["setting"], r["seed"], r["train_examples_asked"]) for r in rows}
    for seed in [int(s) for s in a.seeds.split(",")]:
        for name in names:
            if (name, seed, a.train_examples) in done:
                continue
            out = a.cache / f"sweep-{a.model}-{name.replace(' ', '_')}-{a.train_examples}-{seed}"
            import shutil
            shutil.rmtree(out, ignore_errors=True)
            row = {"model": a.model, "setting": name, **grid[name], "seed": seed,
                   "train_examples_asked": a.train_examples, **run_one(init, out, grid[name], seed, a.train_examples)}
            shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
            a.out.write_text(json.dumps(rows, indent=1) + "\n")
    summary(rows)
    return 0


def summary(rows) -> None:
    for name in dict.fromkeys(r["setting"] for r in rows):
        acc = [r["test_accuracy"] for r in rows if r["setting"] == name]
        sd = st.stdev(acc) if len(acc) > 1 else 0.0
        print(f"{name:24s} {st.mean(acc):.1%} +- {sd:.1%}  (" + ", ".join(f"{x:.1%}" for x in acc) + ")")


if __name__ == "__main__":
    sys.exit(main())
