"""`pretune classify`: the label of each text, and the probability of every label, from a fine-tuned run."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.encoding import TextEncoder
from ..data.labelled import Example
from ..errors import PretuneError
from ..evaluation.classification import predict
from ..models.load import load_classifier
from ..objectives.registry import body_objective
from .texts import read_texts
from ..runs.layout import RunDir


# ---- using a fine-tuned run -----------------------------------------------------------

def _pairs(texts: list[str], pair: bool, text_columns) -> list[tuple[str, str | None]]:
    """(text, second text or None) for each text given ("A<TAB>B" for a pair task; cli texts: read_texts)."""
    out = []
    for item in read_texts(texts, "classify", text_columns or "text"):
        if isinstance(item, tuple):  # a row of a .csv/.jsonl file
            out.append(item)
            continue
        a, _, b = item.partition("\t") if pair else (item, "", "")
        if not a.strip() or (pair and not b.strip()):
            raise PretuneError("an empty text cannot be classified" if not pair else
                               "a pair task needs two texts, separated by a tab", None,
                               "give non-empty text" + (" as 'A<TAB>B'" if pair else ""))
        out.append((a.strip(), b.strip() if pair else None))
    return out


def classify_cmd(texts: list[str], run: Path = Path("runs/finetune/movie-sentiment-gpt-mini"),
                 json_out: bool = False, batch_size: int = 64, weights: str = "auto") -> list[dict]:
    """Classify texts with a fine-tuned run: the label and the probability of each label.

    Args:
        texts: the texts; "@FILE" reads a file (.txt one per line, or .csv/.jsonl), "-" reads stdin
        run: a run directory made by `pretune finetune`
        json_out: print JSON lines instead of a table
        batch_size: texts per forward pass
        weights: auto (the run's own: int4 for a run imported with --weights int4, else fp32), fp32 (as trained), bf16, int8 (per channel) or int4 (groups of 32)
    """
    model, cfg, tok, info = load_classifier(run, weights=weights)
    pairs = _pairs(texts, info.get("pair", False), info.get("text_columns"))
    rc = RunDir(run).read_config()
    max_len = rc.get("finetune", {}).get("max_len") or model.body.max_positions
    te = TextEncoder(tok, body_objective(cfg, rc).template, min(max_len, model.body.max_positions))
    enc = te.encode([Example(a, 0, b) for a, b in pairs], "texts")
    probs = predict(model, enc, te.pad_id, batch_size)
    labels = info["labels"]
    out = []
    kind = info.get("kind", "single")
    threshold = (RunDir(run).results() or {}).get("threshold") or 0.5
    for (a, b), p in zip(pairs, probs.tolist()):
        if kind != "single":  # a number, or the labels whose sigmoid passes the validation's threshold
            text = a if b is None else [a, b]
            rec = {"text": text, "value": p[0]} if kind == "regression" else \
                {"text": text, "labels": [l for l, v in zip(labels, p) if v >= threshold],
                 "probabilities": {l: round(v, 4) for l, v in zip(labels, p)}}
            out.append(rec)
            shown = f"{p[0]:+.3f}" if kind == "regression" else ",".join(rec["labels"]) or "(none)"
            print(json.dumps(rec) if json_out else f"{shown:<12} {str(text)[:80]}")
            continue
        k = max(range(len(p)), key=p.__getitem__)
        rec = {"text": a if b is None else [a, b], "label": labels[k],
               "probabilities": {l: round(v, 4) for l, v in zip(labels, p)}}
        out.append(rec)
        if json_out:
            print(json.dumps(rec))
        else:
            others = sorted(((v, l) for l, v in zip(labels, p) if l != labels[k]), reverse=True)[:4]
            rest = "  ".join(f"{l} {v:.3f}" for v, l in others)
            text = a if b is None else f"{a} | {b}"
            print(f"{labels[k]:<12} {p[k]:.3f}   ({rest})   {text[:80]}")
    return out
