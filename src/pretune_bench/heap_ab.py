"""The speed cost of tasks/heap.py (glibc's mmap threshold fixed at 128 KiB, so every block above it
is mmap'd and returned on free): a MiniLM fine-tuning step with the threshold as heap.py sets it
against `MALLOC_MMAP_THRESHOLD_=33554432` (32 MiB, glibc's ceiling for the dynamic threshold; when
the variable is set heap.py leaves it alone). An environment variable cannot change inside one
process, so short subprocesses alternate (A B, B A, ...), each timing its own steps (the step
alone: before_step to after_step, evaluations left out, the first steps as warm-up).

    python -m pretune_bench.heap_ab --rounds 4 --method full

`--compare checkpointing` times the same step without and with `--train.activation-checkpointing`
(what recomputing the frozen blocks costs a LoRA step: `--method lora`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pretune_bench.lora import COMMON, METHODS, POOL, source_run

# side -> (MALLOC_MMAP_THRESHOLD_ or None, extra fine-tuning options)
COMPARE = {"heap": {"heap.py (128 KiB)": (None, []), "MALLOC_MMAP_THRESHOLD_=33554432": ("33554432", [])},
           "checkpointing": {"no checkpointing": (None, ["--train.activation-checkpointing", "false"]),
                             "activation checkpointing": (None, ["--train.activation-checkpointing", "true"])}}


def one(init: Path, out: Path, method: str, warmup: int, extra: list[str]) -> dict:
    """Time the steps of one short fine-tuning in this process."""
    import torch

    from pretune.cli import main
    from pretune.tasks import finetune as F
    from pretune.training.hooks import Hook
    torch.set_num_threads(1)
    times: list[float] = []

    class Clock(Hook):
        def before_step(self, trainer):
            self.t = time.perf_counter()

        def after_step(self, trainer, loss, parts):
            times.append(time.perf_counter() - self.t)

    orig = F.default_hooks
    F.default_hooks = lambda *a, extra=(), **kw: orig(*a, extra=(*extra, Clock()), **kw)
    cpu0 = time.process_time()
    argv = ["finetune", "--init", str(init), "--task", "movie-sentiment", "--out", str(out), "--train.seed", "0",
            "--finetune.train-examples", "160", "--finetune.epochs", "1", *COMMON, *POOL["minilm"], *METHODS[method], *extra]
    assert main(argv) == 0
    t = times[warmup:]
    return {"median_s": st.median(t), "steps": len(t), "cpu_s": time.process_time() - cpu0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--method", choices=sorted(METHODS), default="full")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pretune-bench-lora")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--compare", choices=sorted(COMPARE), default="heap")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.cache.mkdir(parents=True, exist_ok=True)
    init = source_run("minilm", a.cache)
    if a.one:
        out = a.cache / f"heap-ab-{os.getpid()}"
        import shutil
        try:
            print("ROW " + json.dumps(one(init, out, a.method, a.warmup, COMPARE[a.compare][a.one][1])), flush=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return 0
    sides = COMPARE[a.compare]
    names = list(sides)
    res: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # the order flips every round
            env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
            if sides[name][0]:
                env["MALLOC_MMAP_THRESHOLD_"] = sides[name][0]
            p = subprocess.run([sys.executable, "-m", "pretune_bench.heap_ab", "--one", name, "--compare", a.compare,
                                "--method", a.method,
                                "--warmup", str(a.warmup), "--cache", str(a.cache)], env=env,
                               capture_output=True, text=True)
            row = next((json.loads(l[4:]) for l in p.stdout.splitlines() if l.startswith("ROW ")), None)
            if row is None:
                print(p.stderr[-2000:], file=sys.stderr)
                return 1
            res[name].append(row["median_s"])
            print(f"round {r} {name}: {row['median_s']:.3f} s/step ({row['steps']} steps)", flush=True)
    med = {n: st.median(v) for n, v in res.items()}
    ratio = med[names[0]] / med[names[1]]
    print(f"median s/step: " + ", ".join(f"{n} {m:.3f}" for n, m in med.items())
          + f"; {names[0]} / {names[1]} = {ratio:.3f} (> 1: the first is slower)")
    if a.out:
        a.out.write_text(json.dumps({"compare": a.compare, "method": a.method, "rounds": a.rounds, "per_round_s": res,
                                     "median_s": med, "ratio_first_over_second": ratio,
                                     "sides": names}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
