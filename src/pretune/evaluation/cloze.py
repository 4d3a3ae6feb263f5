"""Cloze in LAMBADA's style (Paperno et al. 2016): predict the last word of a passage. The
passages come from the built-in documents `prepare` holds out of the minis' pre-training, and any
passage sharing a 13-gram with the training split is dropped (GPT-3's decontamination check,
data/curate_filters.py). Scored as the harness scores lambada: the context is the passage up to
the last space, the continuation " word"; `acc` is greedy decoding giving the word exactly,
`perplexity` exp(-mean log-likelihood of the word). For an imported model the held-out text may
well have been in its own pre-training: nothing can guarantee otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

from ..errors import PretuneError

VERSION = "v1"
SENTENCES, MIN_WORDS, MAX_WORDS = 4, 40, 200
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def passages_of(doc: str) -> list[dict]:
    """Runs of SENTENCES sentences whose last sentence ends in a plain word and a full stop."""
    from ..data.prepare import split_sentences
    sents = [s.strip() for s in split_sentences(" ".join(doc.split())) if s.strip()]
    out = []
    for i in range(0, len(sents) - SENTENCES + 1, SENTENCES):
        text = " ".join(sents[i:i + SENTENCES])
        m = re.search(r" ([A-Za-z]+)[.!?][\"')]*$", text)
        n = len(text.split())
        if m and _WORD.match(m.group(1)) and MIN_WORDS <= n <= MAX_WORDS:
            ctx = text[:m.start()]
            out.append({"context": ctx, "target": m.group(1)})
    return out


def build_passages(corpus=("builtin",), progress: bool = True) -> dict:
    """The held-out passages, decontaminated against the training split; {passages, stats}."""
    from ..data.curate_filters import word_hashes, words
    from ..data.heldout import split_documents, training_ngrams
    cands = [p for d in split_documents(corpus, "val") for p in passages_of(d)]
    train = training_ngrams(corpus)
    keep = [p for p in cands if not train.collisions(word_hashes(words(p["context"] + " " + p["target"])))]
    return {"passages": keep, "stats": {"candidates": len(cands), "contaminated": len(cands) - len(keep),
                                        "kept": len(keep), "ngram": 13, "corpus": list(corpus)}}


def cloze_passages(corpus=("builtin",)) -> dict:
    """The passages, built once and cached (PRETUNE_CACHE) per corpus and version."""
    from ..data.corpora import CORPUS_VERSION
    from ..fileio import atomic_write_json, cache_root
    key = hashlib.sha1(json.dumps([VERSION, CORPUS_VERSION, list(corpus)]).encode()).hexdigest()[:12]
    path = cache_root() / "cloze" / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    d = build_passages(corpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, d)
    return d


def evaluate_cloze(model, tok, passages: list[dict], batch_size: int = 16, truncate: str | None = None) -> dict:
    from .loglikelihood import score_pairs
    if not passages:
        raise PretuneError("no cloze passages", None, "install the built-in corpus sources (see docs/data.md)")
    if not model.config.causal:
        raise PretuneError("the cloze task scores a decoder's continuation", None,
                           "evaluate an encoder by a prompted task (its MLM head)")
    scored = score_pairs(model, tok, [(p["context"], " " + p["target"]) for p in passages], batch_size, truncate,
                         where="cloze")
    lls = [s.loglik for s in scored]
    return {"acc": sum(s.greedy for s in scored) / len(scored), "perplexity": math.exp(-sum(lls) / len(lls)),
            "n": len(scored)}
