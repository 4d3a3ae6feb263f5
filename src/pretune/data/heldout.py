"""Held-out text: the documents `prepare` puts in its validation split (the same hash rule, so
the minis never trained on them), read back as text, and the training split's 13-grams for
decontaminating what evaluation builds from them (GPT-3's check, curate_filters.Decontaminator)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import PretuneError
from .corpora import _unit_hash, corpus_documents, resolve_corpus

# `prepare`'s defaults (data/prepare.py): what the built-in pre-training of the minis holds out
VAL_FRACTION, SEED = 0.01, 1234


def split_documents(corpus=("builtin",), split: str = "val", weights: dict | None = None,
                    val_fraction: float = VAL_FRACTION, seed: int = SEED) -> Iterator[str]:
    """The distinct documents of `corpus` that `prepare` puts in `split` (train or val)."""
    salt, seen = f"val{seed}", set()
    for _, doc in corpus_documents(resolve_corpus(list(corpus), weights)):
        if not doc.strip() or doc in seen:
            continue
        if (_unit_hash(doc, salt) < val_fraction) == (split == "val"):
            seen.add(doc)
            yield doc


def data_folder_documents(folder: Path, split: str = "val") -> Iterator[str]:
    """The text of a prepared data folder's split, recovered from its meta.json (the corpus, the
    weights, the hash rule), so any tokenizer can score the same held-out documents."""
    meta_file = Path(folder) / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise PretuneError("cannot read the data folder's meta.json", str(meta_file),
                           "give a folder made by `pretune prepare`") from e
    if meta.get("curation"):
        raise PretuneError("the data folder was curated; its held-out text cannot be rebuilt from meta.json",
                           str(folder), "score a text file instead (perplexity:FILE)")
    return split_documents(meta.get("corpus") or ["builtin"], split, meta.get("weights"),
                           meta.get("val_fraction", VAL_FRACTION), meta.get("seed", SEED))


def training_ngrams(corpus=("builtin",), n: int = 13):
    """A Decontaminator over the training split's n-grams: `.collisions(word_hashes(words(t)))`
    is non-empty for a text sharing an n-gram with the training text."""
    from .curate_filters import Decontaminator
    return Decontaminator(split_documents(corpus, "train"), n=n, min_words=n)  # 13-grams only
