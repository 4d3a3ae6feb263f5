"""Evaluating a classifier: P(y | x) for a set of texts, accuracy, macro-F1 and the confusion
matrix; `pretune evaluate` (a fine-tuned run on a task, a pre-trained one on held-out text)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch

from ..data.encoding import Encoded, TextEncoder, ordered_batches
from ..data.labelled import Example, kind_labels, load_task, read_labelled_file
from ..errors import PretuneError
from ..models.heads import Classifier
from ..models.load import load_classifier
from ..objectives.registry import body_objective
from ..runs import checkpoint as ckpt
from ..runs.layout import RunDir
from .lm import _evaluate_lm
from .tasks import TaskOptions, run_tasks


# ---- evaluation -------------------------------------------------------------------

@torch.no_grad()
def predict(model: Classifier, enc: Encoded, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """P(y | x) for every example, (N, n_classes), in the order of `enc` (regression: (N, 1), the
    predicted numbers; multi-label: one sigmoid per class)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = torch.empty(len(enc), model.head.out.out_features)
    for idx, b in ordered_batches(enc, batch_size, pad_id):
        logits, _ = model(b["input_ids"].to(dev), b["attention_mask"].to(dev), b["lengths"].to(dev),
                          b["segment_ids"].to(dev) if "segment_ids" in b else None, padded=b.get("padded"))
        out[torch.as_tensor(idx)] = model.head.predictions(logits).cpu()
    model.train(was)
    return out


def classification_metrics(y_true, y_pred, n_classes: int) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows: true label, columns: predicted).
    Macro-F1 averages F1 over the classes present in y_true or y_pred, as scikit-learn's
    f1_score(average="macro") does; a class never predicted has precision 0."""
    y_true, y_pred = list(map(int, y_true)), list(map(int, y_pred))
    cm = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred):
        cm[t][p] += 1
    n = len(y_true)
    f1s = []
    for c in sorted(set(y_true) | set(y_pred)):
        tp = cm[c][c]
        fp = sum(cm[r][c] for r in range(n_classes)) - tp
        fn = sum(cm[c]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / max(n, 1),
            "macro_f1": sum(f1s) / max(len(f1s), 1), "confusion": cm, "n": n}


def _ranks(x):
    """Ranks 1..n, ties given their mean rank (as Spearman's rho needs)."""
    import numpy as np
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):  # ties: the mean of their ranks
        at = x == v
        if at.sum() > 1:
            r[at] = r[at].mean()
    return r


def _pearson(a, b) -> float | None:
    import numpy as np
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else None


def regression_metrics(y_true, y_pred) -> dict:
    """Mean squared error, Pearson's r and Spearman's rho (Pearson's r of the ranks)."""
    import numpy as np
    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float).reshape(-1)
    return {"mse": float(((t - p) ** 2).mean()), "pearson": _pearson(t, p),
            "spearman": _pearson(_ranks(t), _ranks(p)), "n": int(len(t))}


def multilabel_metrics(y_true, probs, threshold: float = 0.5) -> dict:
    """Micro-F1 (counts pooled over the classes) and macro-F1 (the mean of each class's F1, as
    scikit-learn's f1_score(average='macro', zero_division=0)) of P >= threshold; exact-match rate."""
    import numpy as np
    Y = np.asarray(y_true, dtype=bool)
    P = np.asarray(probs, dtype=float) >= threshold
    tp, fp, fn = (Y & P).sum(0), (~Y & P).sum(0), (Y & ~P).sum(0)
    per = [2 * a / (2 * a + b + c) if (2 * a + b + c) else 0.0 for a, b, c in zip(tp, fp, fn)]
    den = 2 * tp.sum() + fp.sum() + fn.sum()
    return {"micro_f1": float(2 * tp.sum() / den) if den else 0.0, "macro_f1": float(np.mean(per)),
            "per_label_f1": [float(v) for v in per], "exact_match": float((Y == P).all(1).mean()),
            "threshold": float(threshold), "n": int(len(Y))}


THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 20)]  # 0.05 .. 0.95


def choose_threshold(y_true, probs) -> float:
    """The threshold of THRESHOLDS with the best micro-F1 on these (validation) examples; a tie
    goes to the one nearest 0.5."""
    return max(THRESHOLDS, key=lambda th: (multilabel_metrics(y_true, probs, th)["micro_f1"], -abs(th - 0.5)))


def kind_metrics(kind: str, y_true, out: torch.Tensor, n_labels: int, threshold: float | None = None) -> dict:
    """The metrics of a kind of label from `predict`'s output: accuracy, macro-F1 and the confusion
    (single); MSE, Pearson, Spearman (regression); micro- and macro-F1 at `threshold` (multi)."""
    if kind == "regression":
        return regression_metrics(y_true, out[:, 0].tolist())
    if kind == "multi":
        return multilabel_metrics(y_true, out.numpy(), 0.5 if threshold is None else threshold)
    return classification_metrics(y_true, out.argmax(-1).tolist(), n_labels)


def metrics_line(kind: str, m: dict) -> str:
    if kind == "regression":
        f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        return f"MSE {m['mse']:.4f}  Pearson {f(m['pearson'])}  Spearman {f(m['spearman'])}"
    if kind == "multi":
        return f"micro-F1 {m['micro_f1']:.3f}  macro-F1 {m['macro_f1']:.3f} (threshold {m['threshold']:.2f})"
    return f"accuracy {m['accuracy']:.1%}  macro-F1 {m['macro_f1']:.3f}"


def format_confusion(cm, labels) -> str:
    w = max(8, *(len(l) for l in labels)) + 1
    lines = ["true \\ predicted".ljust(w + 2) + "".join(l[:w].rjust(w) for l in labels)]
    for l, row in zip(labels, cm):
        lines.append(l[:w].ljust(w + 2) + "".join(f"{v:>{w}}" for v in row))
    return "\n".join(lines)


def plot_confusion(cm, labels, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runs.plots import save_figure

    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k))
    ax.imshow(cm, cmap="Blues")
    top = max(max(r) for r in cm) or 1
    for i in range(k):
        for j in range(k):
            ax.text(j, i, cm[i][j], ha="center", va="center", color="white" if cm[i][j] > top / 2 else "black")
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    plt.close(fig)


def evaluate_cmd(run: Path = Path("runs/finetune/movie-sentiment-gpt-mini"), task: str | None = None, split: str = "test", text_column: str | None = None,
                 label_column: str | None = None, data: Path | None = None, json_out: bool = False,
                 weights: str = "auto", tasks: list[str] | None = None,
                 options: Annotated[TaskOptions, "tasks"] = None) -> dict:
    """Evaluate a run: a fine-tuned one on a task (accuracy, macro-F1, confusion), a pre-trained LM on held-out text.

    Args:
        run: a run directory
        task: the task (default: the run's own); a .csv/.jsonl file is evaluated whole
        split: train, val or test, for a built-in task or the run's own
        text_column: a file's text column(s) (default: the run's)
        label_column: a file's label column (default: the run's, else 'label')
        data: for a pre-trained run: a folder made by `pretune prepare` (default: the run's own data)
        json_out: print JSON instead of a table
        weights: auto (the run's own: int4 for a run imported with --weights int4, else fp32), fp32 (as trained), bf16, int8 (per channel) or int4 (groups of 32)
        tasks: evaluate on these tasks instead (comma-separated): perplexity[:FILE|DATA], cloze, mc:FILE.jsonl, a built-in labelled task prompted (movie-sentiment, ...), prompt:FILE; options --tasks.* (docs/evaluation.md)
    """
    from ..models.quantize import check_weights

    run = Path(run)
    check_weights(weights, "pretune evaluate")
    if tasks:  # evaluation without labels (issue 16): evaluation/tasks.py
        return run_tasks(run, tasks, TaskOptions(**(options or {})) if not isinstance(options, TaskOptions) else options,
                         weights=weights)
    d = ckpt.read_run_config(run)
    if "task" not in d:
        return _evaluate_lm(run, d, data, json_out, weights)
    model, cfg, tok, info = load_classifier(run, weights=weights)
    labels, kind = info["labels"], info.get("kind", "single")
    name = task or info["name"]
    tcols = text_column or ",".join(info.get("text_columns") or ["text"])
    lcol = label_column or info.get("label_column") or "label"
    p = Path(str(name))
    if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson", ".json") and p.exists():
        rows = read_labelled_file(p, tcols, lcol, kind)
        index = {y: i for i, y in enumerate(labels)}
        unseen = sorted({y for _, _, y in rows if y not in index}) if kind == "single" else []
        if unseen:
            raise PretuneError(f"label '{unseen[0]}' was not seen in training (the run knows "
                               f"{', '.join(labels)})", str(p), "evaluate on the run's label set only")
        convert = index.__getitem__ if kind == "single" else \
            kind_labels(kind, rows, str(p), labels[0], labels if kind == "multi" else None)[1]
        examples = [Example(a, convert(y), b) for a, b, y in rows]
        where = str(p)
    else:
        own = RunDir(run).path(info.get("source")) if info.get("source") and Path(info["source"]).suffix else None
        if name == info["name"] and own is not None and own.exists():  # the run's own user file: its split
            files = info.get("files") or {}  # the user's own split, as fine-tuning read it
            t = load_task(str(own), tcols, lcol, kind, files.get("val"), files.get("test"), files.get("split_column"))
        else:
            t = load_task(name, tcols, lcol, kind)
        if t.labels != labels and kind == "single":
            extra = sorted(set(t.labels) - set(labels))
            if extra:
                raise PretuneError(f"label '{extra[0]}' was not seen in training (the run knows "
                                   f"{', '.join(labels)})", str(name), "evaluate on a task with the run's labels")
            index = {y: i for i, y in enumerate(labels)}
            examples = [Example(e.text, index[t.labels[e.label]], e.text_b) for e in t.split(split)]
        else:
            examples = t.split(split)
        where = f"{t.name} {split}"
    max_len = d.get("finetune", {}).get("max_len") or model.body.max_positions
    te = TextEncoder(tok, body_objective(cfg, d).template, min(max_len, model.body.max_positions))
    enc = te.encode(examples, "texts")
    threshold = (RunDir(run).results() or {}).get("threshold")  # multi-label: the one chosen on validation
    m = kind_metrics(kind, enc.labels, predict(model, enc, te.pad_id), len(labels), threshold)
    m["where"] = where
    if json_out:
        print(json.dumps(m))
    else:
        print(f"{where}: {metrics_line(kind, m)}  ({m['n']:,} examples)")
        if kind == "single":
            print(format_confusion(m["confusion"], labels))
    return m
