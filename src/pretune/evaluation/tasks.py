"""`pretune evaluate RUN --tasks ...`: the registry of task names, the options they share, the
results as a table, as JSON (--tasks.json FILE) and as a plot of accuracy against shots.

Names: `perplexity` (the built-in corpus's held-out documents), `perplexity:PATH` (a text or
.jsonl file or folder, or a data folder made by `pretune prepare`: its validation split),
`cloze` (LAMBADA-style, held-out and decontaminated), `mc:FILE.jsonl` (or any .jsonl of
context/choices/gold: multiple choice), a built-in labelled task (movie-sentiment, tweet-sentiment,
sms-spam, trec) or `prompt:FILE.csv|.jsonl` (prompted classification, zero- and k-shot)."""

from __future__ import annotations

import difflib
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PretuneError


@dataclass
class TaskOptions:
    shots: list[int] = field(default_factory=lambda: [0])  # demonstrations per prompt (e.g. 0,4,8), prompted tasks
    seeds: list[int] = field(default_factory=lambda: [0])  # seeds of the k-shot draws (the mean is reported)
    limit: int | None = None  # at most this many examples per task
    calibrate: bool = False  # contextual calibration of prompted tasks (Zhao et al. 2021)
    template: Path | None = None  # a prompt template file (.json/.yaml) replacing the task's own
    truncate: str | None = None  # 'left': cut contexts longer than the window from the left (default: refuse)
    stride: int | None = None  # perplexity: the sliding window's stride in tokens (default: the window)
    window: int | None = None  # perplexity: the window in tokens (default: the model's)
    batch_size: int = 16  # requests per forward pass
    json: Path | None = None  # write the results as JSON to this file
    plot: Path | None = None  # write accuracy against shots as a PNG (prompted tasks, several shots)


PROMPTED = ("movie-sentiment", "tweet-sentiment", "sms-spam", "trec")


def _kind(name: str) -> tuple[str, str | None]:
    """(kind, argument) of a task name."""
    from ..data.labelled import ALIASES, BUILTIN
    head, sep, arg = name.partition(":")
    if head in ("perplexity", "ppl", "bpb", "bits-per-byte"):
        return "perplexity", arg or None
    if head == "cloze" and not arg:
        return "cloze", None
    if head == "mc" and arg:
        return "mc", arg
    if head == "prompt" and arg:
        return "prompt", arg
    if not sep and (name in BUILTIN or name in ALIASES):
        return "prompt", name
    if not sep and name.lower().endswith((".jsonl", ".ndjson")):
        return "mc", name
    near = difflib.get_close_matches(name, ["perplexity", "cloze", *PROMPTED], n=2)
    raise PretuneError(f"unknown task '{name}'", "--tasks", (f"did you mean {' or '.join(near)}? " if near else "")
                       + "use perplexity[:FILE], cloze, mc:FILE.jsonl, prompt:FILE or " + ", ".join(PROMPTED))


def _texts(arg: str | None, limit: int | None) -> tuple[list[str], str]:
    from itertools import islice

    from ..data.corpora import file_documents
    from ..data.heldout import data_folder_documents, split_documents
    if arg is None:
        docs, where = split_documents(), "the built-in corpus, held-out documents"
    else:
        p = Path(arg)
        if (p / "meta.json").is_file():
            docs, where = data_folder_documents(p), f"{p} (validation split)"
        elif p.exists():
            docs, where = file_documents(p), str(p)
        else:
            raise PretuneError("no such text file or data folder", arg, "give a .txt/.jsonl file or a `pretune prepare` folder")
    return list(islice(docs, limit)), where


def run_one(model, tok, name: str, o: TaskOptions) -> list[dict]:
    """The result rows of one task name (a prompted task: one row per number of shots)."""
    kind, arg = _kind(name)
    if kind == "perplexity":
        from .perplexity import perplexity
        docs, where = _texts(arg, o.limit)
        m = perplexity(model, tok, docs, o.window, o.stride, max(1, o.batch_size // 4))
        m.pop("loglik")
        return [{"task": name, "source": where, **m}]
    if kind == "cloze":
        from .cloze import cloze_passages, evaluate_cloze
        d = cloze_passages()
        ps = d["passages"][:o.limit] if o.limit else d["passages"]
        return [{"task": name, **evaluate_cloze(model, tok, ps, o.batch_size, o.truncate), "passages": d["stats"]}]
    if kind == "mc":
        from .multiple_choice import evaluate_choices, read_choices
        ex = read_choices(arg)[:o.limit] if o.limit else read_choices(arg)
        m = evaluate_choices(model, tok, ex, batch_size=o.batch_size, truncate=o.truncate, where=arg)
        m.pop("examples")
        return [{"task": name, **m}]
    from .prompting import prompted_accuracy
    rows = []
    for k in o.shots:
        per = [prompted_accuracy((model, tok), arg, k, s, o.limit, o.calibrate, o.template, "test",
                                 o.batch_size, o.truncate) for s in (o.seeds if k else o.seeds[:1])]
        accs = [r["acc"] for r in per]
        rows.append({"task": name, "shots": k, "acc": statistics.mean(accs),
                     "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                     "macro_f1": statistics.mean(r["macro_f1"] for r in per), "per_seed": accs,
                     "seeds": o.seeds if k else o.seeds[:1], "calibrated": o.calibrate, "n": per[0]["n"],
                     "majority": per[0]["majority"], "method": per[0]["method"]})
    return rows


def format_row(r: dict) -> str:
    label = r["task"] + (f" ({r['shots']}-shot{', calibrated' if r.get('calibrated') else ''})" if "shots" in r else "")
    if "bits_per_byte" in r:
        vals = f"perplexity {r['perplexity']:.2f}  bits/byte {r['bits_per_byte']:.4f}  word ppl {r['word_perplexity']:.2f}"
        n = f"{r['tokens']:,} tokens, {r['n']} docs"
    elif "acc_norm" in r:
        vals, n = f"acc {r['acc']:.1%}  acc_norm {r['acc_norm']:.1%}", f"{r['n']} examples"
    elif "perplexity" in r:
        vals, n = f"acc {r['acc']:.1%}  target perplexity {r['perplexity']:.1f}", f"{r['n']} passages"
    else:
        sd = f" ± {r['acc_std']:.1%}" if r.get("acc_std") else ""
        vals, n = f"acc {r['acc']:.1%}{sd}  macro-F1 {r['macro_f1']:.3f}  (majority {r['majority']:.1%})", f"{r['n']} examples"
    return f"{label:<40} {vals:<64} {n}"


def plot_shots(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runs.plots import save_figure
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for task in dict.fromkeys(r["task"] for r in rows if "shots" in r):
        pts = sorted((r["shots"], r["acc"], r["acc_std"]) for r in rows if r.get("task") == task and "shots" in r)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=task)
    ax.set_xlabel("shots (k demonstrations in the prompt)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def run_tasks(run: Path, tasks: list[str], o: TaskOptions | None = None, weights: str = "auto") -> dict:
    """Evaluate a run (or checkpoint folder) on task names; print a table, write --tasks.json/.plot."""
    from ..fileio import atomic_write_json, check_creatable
    from ..models.load import load_model
    from ..models.quantize import weights_of
    o = o or TaskOptions()
    names = [t for t in tasks if t]
    kinds = [_kind(t) for t in names]  # every name checked before any model is loaded
    for f in (o.json, o.plot):
        if f is not None:
            check_creatable(f, "the output file", folder=False)
    model, cfg, tok = load_model(run, weights=weights)  # fp32, bf16, int8, int4 (models/quantize.py)
    if not cfg.causal and any(k in ("perplexity", "cloze", "mc") for k, _ in kinds):
        bad = next(n for n, (k, _) in zip(names, kinds) if k in ("perplexity", "cloze", "mc"))
        raise PretuneError(f"the task '{bad}' needs a decoder; {run} is an encoder", str(run),
                           "evaluate an encoder on a prompted task (its MLM head fills a cloze pattern)")
    rows = [r for n in names for r in run_one(model, tok, n, o)]
    for r in rows:
        print(format_row(r))
    out = {"run": str(run), "model": cfg.name, "weights": weights_of(model), "options": {k: (str(v) if isinstance(v, Path) else v)
                                                            for k, v in vars(o).items()}, "results": rows}
    if o.json is not None:
        atomic_write_json(o.json, out)
    if o.plot is not None and len(o.shots) > 1:
        plot_shots(rows, o.plot, f"{Path(run).name}: accuracy against shots")
    return out
