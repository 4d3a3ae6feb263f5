"""`pretune classify`: the label of each text, and the probability of every label, from a fine-tuned run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data.encoding import TextEncoder
from ..data.labelled import Example, read_labelled_file
from ..errors import PretuneError
from ..evaluation.classification import predict
from ..models.load import load_classifier
from ..runs.layout import RunDir


# ---- using a fine-tuned run -----------------------------------------------------------

def _read_texts(texts: list[str], pair: bool, text_columns) -> list[tuple[str, str | None]]:
    """Texts from the command line: each argument a text ("A<TAB>B" for a pair task),
    "@FILE" (.txt: one per line; .csv/.tsv/.jsonl: the task's text column(s)), "-" stdin."""
    out = []
    for s in texts:
        if s == "-":
            lines = sys.stdin.read().splitlines()
        elif s.startswith("@"):
            p = Path(s[1:])
            if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson", ".json"):
                rows = read_labelled_file(p, text_columns or "text", None)
                out += [(a, b) for a, b, _ in rows]
                continue
            if not p.is_file():
                raise PretuneError("no such file", str(p), "give @FILE with one text per line")
            lines = p.read_text(encoding="utf-8").splitlines()
            lines = [l for l in lines if l.strip()]
        else:
            lines = [s]
        for l in lines:
            a, _, b = l.partition("\t") if pair else (l, "", "")
            if not a.strip() or (pair and not b.strip()):
                raise PretuneError("an empty text cannot be classified" if not pair else
                                   "a pair task needs two texts, separated by a tab", None,
                                   "give non-empty text" + (" as 'A<TAB>B'" if pair else ""))
            out.append((a.strip(), b.strip() if pair else None))
    if not out:
        raise PretuneError("no texts to classify", None, 'give texts, "@FILE" or "-" (stdin)')
    return out


def classify_cmd(texts: list[str], run: Path = Path("runs/finetune/movie-sentiment-gpt-mini"),
                 json_out: bool = False, batch_size: int = 64) -> list[dict]:
    """Classify texts with a fine-tuned run: the label and the probability of each label.

    Args:
        texts: the texts; "@FILE" reads a file (.txt one per line, or .csv/.jsonl), "-" reads stdin
        run: a run directory made by `pretune finetune`
        json_out: print JSON lines instead of a table
        batch_size: texts per forward pass
    """
    model, cfg, tok, info = load_classifier(run)
    pairs = _read_texts(texts, info.get("pair", False), info.get("text_columns"))
    max_len = RunDir(run).read_config().get("finetune", {}).get("max_len") \
        or model.body.max_positions
    te = TextEncoder(tok, cfg.causal, min(max_len, model.body.max_positions))
    enc = te.encode([Example(a, 0, b) for a, b in pairs], "texts")
    probs = predict(model, enc, te.pad_id, batch_size)
    labels = info["labels"]
    out = []
    for (a, b), p in zip(pairs, probs.tolist()):
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
