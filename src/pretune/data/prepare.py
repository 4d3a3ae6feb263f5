"""Token shards and the batch loaders that read them.

`prepare` streams documents -> sentences -> token ids -> flat binary shards, a
chunk of about `chunk_bytes` of text at a time, so memory stays bounded whatever
the corpus size. A prepared folder holds, per split (train, val):

  {split}.bin        the token stream, uint16 when the vocabulary fits, else uint32;
                     documents one after another, each followed by the separator
                     (<|endoftext|>, or [SEP] for a WordPiece vocabulary)
  {split}.sents.bin  int64 (n_sentences, 2): [start, end) of each sentence in the stream
  {split}.docs.bin   int64 (n_documents + 1): each document's first sentence index
  meta.json          dtype, counts per split and per source, the tokenizer's special ids,
                     text_sha256: the checksum of the text tokenized (corpora.TextDigest)
  tokenizer.json     the tokenizer that made it

Held-out split: a whole document goes to validation when a keyed hash of its
text falls below val_fraction. Nothing straddles the two, and a document that
appears twice (a source weighted above one epoch) lands on the same side both times.

Sentences come from a small regex splitter (end punctuation before whitespace,
line breaks). Each piece keeps the whitespace in front of it, and both the byte-level
BPE and the BERT pre-tokenizer split there anyway, so encoding sentence by sentence
gives the same ids as encoding the whole document.

Loaders: batch k is a pure function of (seed, k): its torch.Generator is seeded
from both. The loader's state is the batch counter alone, so resuming is exact.

  LMBatches     GPT (L1): B windows of T+1 tokens at random offsets, as nanoGPT
                draws them; targets are the inputs shifted by one.
  PairBatches   BERT (MLM + NSP): [CLS] A [SEP] B [SEP] as create_pretraining_data.py
                builds them (Devlin et al. 2019, sec. 3.1 and A.2).
  validation_batches  a fixed set of validation batches, the same on every call.

An objective names its loader ("windows", "pairs": data/loaders.py LOADERS).
"""

from __future__ import annotations

import os
import re
import time
from itertools import chain
from pathlib import Path

import numpy as np

from ..errors import PretuneError
from ..fileio import atomic_dir, atomic_write_json, check_creatable
from .corpora import TextDigest, _unit_hash, corpus_documents, resolve_corpus


FORMAT = 1


SPLITS = ("train", "val")


# -- sentences ------------------------------------------------------------------

# A boundary after . ! ? (and closing quotes/brackets) before whitespace, or before a line break.
_BOUNDARY = re.compile(r"(?<=[.!?])(?=\s)|(?<=[.!?][\"'\u201d\u2019)\]])(?=\s)|(?=\n)")


_ABBREV = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Gen|Col|Capt|Lt|Rev|Hon|vs|etc|viz|cf|al|No|Vol|pp|"
                     r"i\.e|e\.g|[A-Z])\.)$")


def split_sentences(text: str) -> list[str]:
    """Cut a document into sentences; their concatenation is the text itself. Each
    piece keeps its leading whitespace; abbreviations (Mr., e.g., initials) do not end one."""
    out: list[str] = []
    carry = ""
    for piece in _BOUNDARY.split(text):
        if not piece:
            continue
        if not piece.strip():  # whitespace only: it belongs to the next sentence
            carry += piece
            continue
        piece = carry + piece
        carry = ""
        if out and _ABBREV.search(out[-1]) and piece[:1] == " ":
            out[-1] += piece
        else:
            out.append(piece)
    if carry:
        if out:
            out[-1] += carry
    return out


# -- prepare ------------------------------------------------------------------------

class _SplitWriter:
    """Appends documents to one split's three files."""

    def __init__(self, folder: Path, split: str, dtype):
        self.dtype = dtype
        self.f_tok = open(folder / f"{split}.bin", "wb")
        self.f_sent = open(folder / f"{split}.sents.bin", "wb")
        self.f_doc = open(folder / f"{split}.docs.bin", "wb")
        self.tokens = self.sentences = self.documents = 0

    def write(self, toks: np.ndarray, sent_lens: np.ndarray, sep: int) -> None:
        """One document: its tokens (sentences back to back), then the separator."""
        ends = self.tokens + np.cumsum(sent_lens)
        starts = ends - sent_lens
        np.stack([starts, ends], 1).astype(np.int64).tofile(self.f_sent)
        np.array([self.sentences], np.int64).tofile(self.f_doc)
        toks.astype(self.dtype).tofile(self.f_tok)
        np.array([sep], self.dtype).tofile(self.f_tok)
        self.tokens += len(toks) + 1
        self.sentences += len(sent_lens)
        self.documents += 1

    def close(self) -> None:
        np.array([self.sentences], np.int64).tofile(self.f_doc)  # the sentinel: docs[d+1] ends doc d
        for f in (self.f_tok, self.f_sent, self.f_doc):
            f.flush()
            os.fsync(f.fileno())
            f.close()


def _encode_chunk(tok, chunk: list[tuple[str, str]]):
    """Token ids of a chunk of documents: (all ids, sentence lengths, sentences per doc)."""
    sents = [split_sentences(doc) for _, doc in chunk]
    flat = list(chain.from_iterable(sents))
    ids = tok.encode_batch(flat, add_special_tokens=False, parse_special=False)
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    toks = np.fromiter(chain.from_iterable(ids), np.int64, int(lens.sum()))
    per_doc = np.fromiter(map(len, sents), np.int64, len(sents))
    return toks, lens, per_doc


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").exists())):
        raise PretuneError("the output exists and is not a folder made by `pretune prepare`", str(out),
                           "choose another --out (it would be replaced)")


def prepare(sources: list[str], tokenizer="bpe-8192", out_dir: str | Path = "runs/data/builtin",
            val_fraction: float = 0.01, seed: int = 1234, weights: dict[str, float] | None = None,
            max_bytes: int | None = None, chunk_bytes: int = 1 << 22, progress: bool = True,
            curate: list[str] | None = None, decontaminate: list[str] | None = None,
            curation: dict | None = None) -> dict:
    """Tokenize a corpus into train/val shards under `out_dir`; returns meta.json's contents.

    sources: built-in source names, "builtin", or .txt/.jsonl files and folders
    tokenizer: a name for load_tokenizer, or a Tokenizer
    weights: epochs per source (see corpora.py); max_bytes: a budget on the text read
    chunk_bytes: text tokenized per step (bounds the memory)
    curate, decontaminate, curation: curation steps, evaluation sets and thresholds (curate.py);
        each source is curated before mixing, and meta.json["curation"] records what each step removed
    """
    from tqdm.auto import tqdm

    from .tokenizers import check_tokenizer_name, load_tokenizer

    # The options first, then the corpus: nothing is read (or trained on) before all are good.
    if not 0.0 < val_fraction < 1.0:
        raise PretuneError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}", None,
                           "use e.g. 0.01")
    out = Path(out_dir)
    _check_out_dir(out)
    check_creatable(out, "the data folder")
    # a file or a packaged vocabulary loads now; bpe-N / wordpiece-N may train on the built-in corpus
    tok = None if check_tokenizer_name(tokenizer) else load_tokenizer(tokenizer)
    curator = None
    if curate or decontaminate:
        from .curate import Curator
        curator = Curator(curate or (), curation, decontaminate or ())
    parts = resolve_corpus(list(sources), weights)  # checks every file before any work
    if curator is not None:
        for q in parts:
            q.documents = curator.wrap(q.name, q.documents)
    if tok is None:
        tok = load_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    sep = tok.doc_separator_id
    salt = f"val{seed}"

    t0 = time.time()
    per_source: dict[str, dict] = {}
    digest = TextDigest()
    # Built in a temporary sibling and swapped into place: the old folder (if any) goes only afterwards.
    with atomic_dir(out, tmp_name=f".{out.name}.tmp-{os.getpid()}", old_name=f".{out.name}.old-{os.getpid()}",
                    what="the data folder") as tmp:
        writers = {s: _SplitWriter(tmp, s, dtype) for s in SPLITS}
        est = int(sum(q.approx_bytes * q.weight for q in parts))
        bar = tqdm(total=min(est, max_bytes or est), unit="B", unit_scale=True, disable=not progress,
                   desc=f"tokenizing ({tok.name})", dynamic_ncols=True)
        n_chunks = 0

        def flush(chunk):
            nonlocal n_chunks
            if not chunk:
                return
            n_chunks += 1
            toks, lens, per_doc = _encode_chunk(tok, chunk)
            sent_end = np.cumsum(lens)
            doc_sent_end = np.cumsum(per_doc)
            for i, (name, doc) in enumerate(chunk):
                s1 = int(doc_sent_end[i])
                s0 = s1 - int(per_doc[i])
                dl = lens[s0:s1]
                keep = dl > 0
                if not keep.any():
                    continue
                t1 = int(sent_end[s1 - 1]) if s1 else 0
                t0_ = t1 - int(dl.sum())
                split = "val" if _unit_hash(doc, salt) < val_fraction else "train"
                writers[split].write(toks[t0_:t1], dl[keep], sep)
                src = per_source.setdefault(name, {"documents": 0, "bytes": 0, "train_tokens": 0, "val_tokens": 0})
                src["documents"] += 1
                src["bytes"] += len(doc.encode("utf-8"))
                src[f"{split}_tokens"] += t1 - t0_ + 1
            bar.update(sum(len(d.encode("utf-8")) for _, d in chunk))

        chunk, size = [], 0
        for name, doc in corpus_documents(parts, max_bytes):
            if not doc.strip():
                continue
            digest.update(doc)
            chunk.append((name, doc))
            size += len(doc)
            if size >= chunk_bytes:
                flush(chunk)
                chunk, size = [], 0
        flush(chunk)
        bar.close()
        for w in writers.values():
            w.close()

        n_docs = sum(w.documents for w in writers.values())
        if n_docs == 0:
            raise PretuneError("the corpus holds no text", ", ".join(map(str, sources)), "give files with text in them")
        if writers["val"].documents == 0 or writers["train"].documents == 0:
            empty = "validation" if writers["val"].documents == 0 else "training"
            raise PretuneError(f"the {empty} split is empty ({n_docs} documents, val_fraction={val_fraction})",
                               ", ".join(map(str, sources)),
                               "give more documents (blank lines separate them) or change --val-fraction")
        meta = {
            "format": FORMAT,
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name,
            "separator_id": sep,
            "special": tok.special_dict(),
            "splits": {s: {"tokens": w.tokens, "documents": w.documents, "sentences": w.sentences}
                       for s, w in writers.items()},
            "sources": per_source,
            "weights": {q.name: q.weight for q in parts},
            "corpus": [str(s) for s in sources],
            "val_fraction": val_fraction,
            "seed": seed,
            "split_rule": f"blake2b(text, person='{salt}') / 2**64 < val_fraction -> val",
            "text_sha256": digest.hexdigest(),
            "chunks": n_chunks,
            "seconds": round(time.time() - t0, 2),
        }
        if curator is not None:
            meta["curation"] = curator.report()
        tok.save(tmp)
        atomic_write_json(tmp / "meta.json", meta)
    return meta


def _parse_weights(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    out = {}
    for it in items:
        name, eq, val = str(it).partition("=")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            eq = ""
        if not eq:
            raise PretuneError(f"weight '{it}' is not name=epochs", "--weights", "write e.g. wikipedia=2,movies=0.5")
    return out


def prepare_cmd(corpus: list[str] | None = None, tokenizer: str = "bpe-8192", out: Path | None = None,
                weights: list[str] | None = None, val_fraction: float = 0.01, seed: int = 1234,
                max_mb: float | None = None, curate: list[str] | None = None,
                decontaminate: list[str] | None = None) -> dict:
    """Tokenize text into memory-mapped train/val token shards for pre-training.

    Args:
        corpus: comma-separated built-in sources (builtin = movies, wikipedia, bible; austen,
            opt-in, only when named) or UTF-8 .txt/.jsonl files and folders; in .txt files a
            blank line ends a document (default: builtin)
        tokenizer: gpt2, bert-uncased, bpe-N, wordpiece-N, or a tokenizer.json path
        out: the output folder (default: runs/data/<corpus>-<tokenizer>)
        weights: epochs per source, e.g. wikipedia=2,movies=0.5 (GPT-3-style mixing)
        val_fraction: the share of documents held out for validation
        seed: the seed of the held-out split
        max_mb: read at most this many MB of text (each source in proportion)
        curate: curation steps before tokenizing: quality, exact, near, decontaminate, or default
            (quality,exact,near) or all (see docs/data.md)
        decontaminate: evaluation sets that must not leak into the text: built-in tasks (their test
            split) or files, e.g. movie-sentiment,trec; documents sharing a 13-gram are dropped
    """
    corpus = list(corpus or ["builtin"])
    if out is None:
        stem = "builtin" if corpus == ["builtin"] else "-".join(Path(c).stem for c in corpus)[:60]
        out = Path("runs/data") / f"{stem}-{Path(tokenizer).stem if os.sep in tokenizer else tokenizer}"
        if curate or decontaminate:
            out = out.with_name(out.name + "-curated")
    meta = prepare(corpus, tokenizer, out, val_fraction=val_fraction, seed=seed, weights=_parse_weights(weights),
                   max_bytes=None if max_mb is None else int(max_mb * 1e6), curate=curate,
                   decontaminate=decontaminate)
    sp = meta["splits"]
    print(f"{out}: train {sp['train']['tokens']:,} tokens ({sp['train']['documents']:,} documents), "
          f"val {sp['val']['tokens']:,} ({sp['val']['documents']:,}); {meta['dtype']}, "
          f"{meta['tokenizer']} ({meta['vocab_size']:,} tokens), {meta['seconds']:.1f} s")
    for name, s in meta["sources"].items():
        print(f"  {name:<12} {s['documents']:>7,} docs  {s['bytes'] / 1e6:7.2f} MB  "
              f"{s['train_tokens'] + s['val_tokens']:>11,} tokens")
    print(f"  text sha256  {meta['text_sha256']} (the documents tokenized, in order; docs/data.md)")
    if "curation" in meta:
        from .curate import format_report
        print(format_report(meta["curation"]))
    return meta
