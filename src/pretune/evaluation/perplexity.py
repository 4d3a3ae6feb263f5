"""Perplexity and bits per byte of a decoder on held-out text, long texts through a sliding
window (Hugging Face's "Perplexity of fixed-length models" guide; stride = window is the
lm-evaluation-harness's disjoint rolling windows, `loglikelihood_rolling`).

Each document is encoded whole (the tokenizer's own special tokens) after the prefix token
(BOS, else end-of-text), as the harness does; every token is predicted once, from at most
`window` tokens before it, the window moving `stride` tokens at a time. Reported: the token
perplexity exp(NLL / tokens), the word perplexity exp(NLL / words) and bits per byte
NLL / (ln 2 x UTF-8 bytes), which compare across tokenizers (the harness's wikitext metrics;
words split on whitespace as it does)."""

from __future__ import annotations

import math
import re

from ..errors import PretuneError


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(context start, first target, end) over a sequence of n tokens whose token 0 is the prefix:
    targets [a, b) predicted from tokens [start, b - 1), at most `window` of them."""
    if not 1 <= stride <= window:
        raise PretuneError(f"--tasks.stride {stride} must lie between 1 and the window ({window})", None,
                           f"use e.g. {window // 2}")
    out, a = [], 1
    while a < n:
        b = min(a + (window if a == 1 else stride), n)  # the first window predicts all it holds
        out.append((max(0, b - 1 - window), a, b))
        a = b
    return out


def document_requests(tok, docs, window: int, stride: int):
    """The scorer's token requests of every document, and per document its request count."""
    from .loglikelihood import prefix_id
    p = prefix_id(tok)
    reqs, counts = [], []
    for d in docs:
        s = [p] + tok.encode(d)
        w = windows(len(s), window, stride)
        reqs += [(s[i:a], s[a:b]) for i, a, b in w]
        counts.append(len(w))
    return reqs, counts


def perplexity(model, tok, docs: list[str], window: int | None = None, stride: int | None = None,
               batch_size: int = 4, progress: bool = True) -> dict:
    """Token and word perplexity and bits per byte of `docs`."""
    from .loglikelihood import Scorer
    if not model.config.causal:
        raise PretuneError("perplexity and bits per byte need a decoder (causal) model", None,
                           "evaluate an encoder by a prompted task (its MLM head) or fine-tune it")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise PretuneError("no text to score", None, "give a text file with some text in it")
    window = min(window or model.max_positions, model.max_positions)
    stride = stride or window
    reqs, counts = document_requests(tok, docs, window, stride)
    scored = Scorer(model, batch_size, progress).loglikelihood(reqs)
    per_doc, k = [], 0
    for c in counts:
        per_doc.append(sum(s.loglik for s in scored[k:k + c]))
        k += c
    nll = -sum(s.loglik for s in scored)
    tokens = sum(s.n_tokens for s in scored)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_words = sum(len(re.split(r"\s+", d)) for d in docs)
    return {"perplexity": math.exp(nll / tokens), "word_perplexity": math.exp(nll / n_words),
            "bits_per_byte": nll / (math.log(2) * n_bytes), "nll": nll, "tokens": tokens, "bytes": n_bytes,
            "words": n_words, "n": len(docs), "window": window, "stride": stride, "loglik": per_doc}
