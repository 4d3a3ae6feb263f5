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
  eval_batches  a fixed set of validation batches, the same on every call.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from itertools import chain
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import PretuneError
from ..fileio import atomic_write_json, check_creatable, fsync_dir, make_dir
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

    make_dir(out.parent, "the data folder")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_dir(tmp, "the data folder", where=out)
    t0 = time.time()
    per_source: dict[str, dict] = {}
    digest = TextDigest()
    try:
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
        # Swap the finished folder into place: the old one (if any) is removed only afterwards.
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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


# -- reading --------------------------------------------------------------------------

class Shard:
    """One split of a prepared folder, memory-mapped."""

    def __init__(self, data_dir: str | Path, split: str):
        self.dir = Path(data_dir)
        mp = self.dir / "meta.json"
        if not mp.is_file():
            raise PretuneError("not a prepared data folder (no meta.json)", str(self.dir),
                               "run `pretune prepare --out` to make one")
        try:
            self.meta = json.loads(mp.read_text())
            self.meta["splits"], self.meta["dtype"]
        except (ValueError, KeyError, TypeError) as e:
            raise PretuneError(f"meta.json is damaged ({type(e).__name__}: {e})", str(mp),
                               "prepare the data again") from e
        if split not in self.meta["splits"]:
            raise PretuneError(f"no split '{split}'", str(self.dir), f"use one of {', '.join(self.meta['splits'])}")
        info = self.meta["splits"][split]
        self.split = split
        self.dtype = np.dtype(self.meta["dtype"])
        try:
            self.tokens = np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r")
            self.sents = np.memmap(self.dir / f"{split}.sents.bin", dtype=np.int64, mode="r").reshape(-1, 2)
            self.docs = np.memmap(self.dir / f"{split}.docs.bin", dtype=np.int64, mode="r")
        except (OSError, ValueError) as e:
            raise PretuneError(f"cannot read the {split} shard: {e}", str(self.dir), "prepare the data again") from e
        if len(self.tokens) != info["tokens"] or len(self.docs) != info["documents"] + 1:
            raise PretuneError(f"the {split} shard does not match meta.json (truncated?)", str(self.dir),
                               "prepare the data again")

    def __len__(self) -> int:
        return len(self.tokens)


def unigram_entropy(data_dir, split: str = "val", chunk: int = 1 << 22, exclude=()) -> float:
    """H = -sum_v p(v) ln p(v) in nats, p the token frequencies of the split itself: the
    loss of the best context-free model of that text, the bar a language model must clear
    (document separators count as tokens, as the LM loss counts them). `exclude`: token ids
    left out, e.g. the special tokens masked-LM never predicts."""
    shard = Shard(data_dir, split)
    counts = np.zeros(int(shard.meta["vocab_size"]), np.int64)
    for i in range(0, len(shard), chunk):
        counts += np.bincount(shard.tokens[i:i + chunk], minlength=len(counts))[:len(counts)]
    counts[[i for i in exclude if 0 <= i < len(counts)]] = 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def batch_generator(seed: int, k: int) -> torch.Generator:
    """The generator of batch k: seeded from (seed, k) through numpy's SeedSequence,
    so batches are independent of each other and of how many were read before."""
    state = np.random.SeedSequence([int(seed) % (1 << 64), int(k)]).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return g


class _Resumable:
    """The batch counter is the whole state (batch k depends on (seed, k) only)."""

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = batch_generator(self.seed, self.batch)
        self.batch += 1
        return self._make(g)

    def state_dict(self) -> dict:
        return {"batch": self.batch, "seed": self.seed, "split": self.split, "tokens": len(self.shard)}

    def load_state_dict(self, d: dict) -> None:
        if d.get("tokens") is not None and d["tokens"] != len(self.shard):
            raise PretuneError(f"the data changed since the checkpoint ({d['tokens']:,} {self.split} tokens then, "
                               f"{len(self.shard):,} now)", str(self.shard.dir),
                               "resume with the original data folder, or start a new run")
        self.batch = int(d["batch"])


class LMBatches(_Resumable):
    """Next-token batches for L1: B windows at uniformly random offsets (nanoGPT's
    sampling: every token is a window start with equal probability, and documents
    follow one another across their separators)."""

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, seed: int):
        self.shard = Shard(data_dir, split)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.batch = 0
        if len(self.shard) < seq_len + 1:
            raise PretuneError(f"the {split} split has {len(self.shard):,} tokens, fewer than seq_len + 1 = "
                               f"{seq_len + 1}", str(data_dir), "lower the sequence length or give more text")

    def _windows(self, starts: np.ndarray) -> dict:
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        buf = torch.from_numpy(self.shard.tokens[idx].astype(np.int64))
        return {"input_ids": buf[:, :-1], "targets": buf[:, 1:]}

    def _make(self, g: torch.Generator) -> dict:
        starts = torch.randint(len(self.shard) - self.seq_len, (self.batch_size,), generator=g)
        return self._windows(starts.numpy())


class PairBatches(_Resumable):
    """Sentence-pair batches for MLM + NSP, following BERT's create_pretraining_data.py:

    - a target length of seq_len - 3 tokens, or with probability short_seq_prob (0.1)
      a uniform one in [2, seq_len - 3], so the model also sees short sequences;
    - a chunk of consecutive sentences of a random document, filled up to that length,
      cut after a random sentence into A and the rest B (IsNext, probability 0.5), or
      A and sentences of a random other document (NotNext: never another copy of A's own,
      as a mixing weight above 1 or a duplicate puts in the shard); a one-sentence chunk
      is cut at a random token instead, so IsNext keeps exactly probability 0.5;
    - the longer segment is truncated until both fit: A loses tokens at its front and B
      at its back, so an IsNext pair stays two adjacent spans of the text;
    - [CLS] A [SEP] B [SEP], segment ids 0/1, [PAD] to seq_len (attention_mask False there);
    - MLM masking by objectives.mlm_mask with the batch's generator, special tokens never chosen,
      at least one token predicted per pair (BERT's max(1, round(0.15 n))).
    """

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, seed: int,
                 tokenizer_special: dict | None = None, vocab_size: int | None = None,
                 short_seq_prob: float = 0.1):
        self.shard = Shard(data_dir, split)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.short_seq_prob = short_seq_prob
        self.batch = 0
        sp = {k.removesuffix("_id"): v for k, v in (tokenizer_special or self.shard.meta["special"]).items()}
        self.cls, self.sep, self.pad, self.mask = sp.get("cls"), sp.get("sep"), sp.get("pad"), sp.get("mask")
        if None in (self.cls, self.sep, self.pad, self.mask):
            raise PretuneError(f"sentence pairs need [CLS], [SEP], [PAD] and [MASK]; the tokenizer "
                               f"'{self.shard.meta['tokenizer']}' lacks some", str(data_dir),
                               "prepare the data with bert-uncased or wordpiece-N")
        self.special = torch.tensor(sorted({v for v in sp.values() if v is not None}))
        self.vocab_size = vocab_size or self.shard.meta["vocab_size"]
        if seq_len < 8:
            raise PretuneError(f"seq_len={seq_len} is too short for sentence pairs", None, "use at least 8")
        if len(self.shard.docs) - 1 < 2:
            raise PretuneError(f"the {split} split has fewer than 2 documents; NotNext pairs need another one",
                               str(data_dir), "give more documents")
        self.n_sents = len(self.shard.sents)

    def _doc_of(self, s: int) -> tuple[int, int]:
        """[first, end) sentence indices of the document holding sentence s."""
        docs = self.shard.docs
        d = int(np.searchsorted(docs, s, side="right")) - 1
        return int(docs[d]), int(docs[d + 1])

    def _fill(self, s: int, de: int, target: int) -> int:
        """End (exclusive) of the chunk of sentences s.. that first reaches `target` tokens."""
        sents = self.shard.sents
        L = sents[s:de, 1] - sents[s, 0]
        return min(s + 1 + int(np.searchsorted(L, target)), de)

    def _outside(self, v: float, ds: int, n_doc: int) -> int:
        """The sentence a uniform v in [0, 1) picks among those outside the document [ds, ds + n_doc)."""
        r = min(int(v * (self.n_sents - n_doc)), self.n_sents - n_doc - 1)
        return r + n_doc if r >= ds else r

    def _same_text(self, ds: int, de: int, rds: int, rde: int) -> bool:
        """Do the documents of sentences [ds, de) and [rds, rde) hold the same tokens?"""
        sents = self.shard.sents
        if de - ds != rde - rds or ds == rds:
            return ds == rds
        a0, a1, b0, b1 = int(sents[ds, 0]), int(sents[de - 1, 1]), int(sents[rds, 0]), int(sents[rde - 1, 1])
        return a1 - a0 == b1 - b0 and np.array_equal(self.shard.tokens[a0:a1], self.shard.tokens[b0:b1])

    def _pair(self, u: np.ndarray) -> tuple[int, int, int, int, int]:
        """(A start, A end, B start, B end, NSP label) for one example, from uniforms u."""
        sents = self.shard.sents
        M = self.seq_len - 3
        target = M if u[0] >= self.short_seq_prob else 2 + int(u[1] * (M - 1))
        is_next = u[2] < 0.5
        s = min(int(u[3] * self.n_sents), self.n_sents - 1)
        ds, de = self._doc_of(s)
        if is_next and s == de - 1 and de - ds >= 2:
            s -= 1  # start one sentence earlier so a next sentence exists
        e = self._fill(s, de, target)
        if is_next and e - s == 1 and e < de:
            e += 1
        if is_next:
            if e - s >= 2:
                cut = int(sents[s + 1 + int(u[4] * (e - s - 1)), 0])
            else:  # a single sentence: cut it at a random token
                n = int(sents[s, 1] - sents[s, 0])
                cut = int(sents[s, 0]) + 1 + int(u[4] * (n - 1)) if n >= 2 else None
            if cut is not None:
                a0, a1, b0, b1 = int(sents[s, 0]), cut, cut, int(sents[e - 1, 1])
                label = 0
            else:
                is_next = False
        if not is_next:
            a_end = s + 1 + int(u[4] * (e - s - 1)) if e - s >= 2 else e
            a0, a1 = int(sents[s, 0]), int(sents[a_end - 1, 1])
            n_doc = de - ds
            r = self._outside(u[5], ds, n_doc)  # a uniform sentence outside this document
            rds, rde = self._doc_of(r)
            tries = 0
            while self._same_text(ds, de, rds, rde):
                # another copy of this document (a mixing weight above 1, or a duplicate in the
                # corpus): its text is this document's, so draw again, from a generator seeded by u
                tries += 1
                if tries > 64:
                    raise PretuneError(f"the {self.split} split holds copies of one document only; NotNext pairs "
                                       "need another one", str(self.shard.dir), "give more documents")
                r = self._outside(np.random.default_rng([int(u[5] * 2 ** 53), tries]).random(), ds, n_doc)
                rds, rde = self._doc_of(r)
            re_ = self._fill(r, rde, max(1, target - (a1 - a0)))
            b0, b1 = int(sents[r, 0]), int(sents[re_ - 1, 1])
            label = 1
        la, lb = a1 - a0, b1 - b0
        if la + lb > M:  # truncate the longer one first, never below half the room
            if la >= lb:
                la = max(M - lb, M - M // 2)
                lb = min(lb, M - la)
            else:
                lb = max(M - la, M - M // 2)
                la = min(la, M - lb)
        return a1 - la, a1, b0, b0 + lb, label

    def _make(self, g: torch.Generator) -> dict:
        B, T = self.batch_size, self.seq_len
        u = torch.rand(B, 6, generator=g, dtype=torch.float64).numpy()
        ids = np.full((B, T), self.pad, np.int64)
        seg = np.zeros((B, T), np.int64)
        att = np.zeros((B, T), bool)
        nsp = np.zeros(B, np.int64)
        toks = self.shard.tokens
        for i in range(B):
            a0, a1, b0, b1, nsp[i] = self._pair(u[i])
            la, lb = a1 - a0, b1 - b0
            n = la + lb + 3
            ids[i, 0] = self.cls
            ids[i, 1:1 + la] = toks[a0:a1]
            ids[i, 1 + la] = self.sep
            ids[i, 2 + la:2 + la + lb] = toks[b0:b1]
            ids[i, n - 1] = self.sep
            seg[i, 2 + la:n] = 1
            att[i, :n] = True
        input_ids = torch.from_numpy(ids)
        from ..objectives import mlm_mask, mlm_rows

        special = torch.isin(input_ids, self.special) | ~torch.from_numpy(att)
        masked, labels = mlm_mask(input_ids, special, self.mask, self.vocab_size, g)
        return {"input_ids": masked, "segment_ids": torch.from_numpy(seg), "attention_mask": torch.from_numpy(att),
                "labels": labels, "nsp_labels": torch.from_numpy(nsp),
                "mlm_rows": mlm_rows(labels)}  # found here, on the CPU: no host sync in the loss


def eval_batches(data_dir, split: str, batch_size: int, seq_len: int, n_batches: int = 10,
                 causal: bool = True, seed: int = 0) -> Iterator[dict]:
    """A fixed set of validation batches, identical on every call (the loss estimate
    then compares like with like across steps). Decoder: n_batches * batch_size windows
    at evenly spaced offsets over the whole split; encoder: the first n_batches pair
    batches of a PairBatches seeded with `seed`."""
    if causal:
        lm = LMBatches(data_dir, split, batch_size, seq_len, seed)
        n = len(lm.shard) - seq_len - 1
        starts = np.linspace(0, n, n_batches * batch_size).astype(np.int64)
        for b in range(n_batches):
            yield lm._windows(starts[b * batch_size:(b + 1) * batch_size])
    else:
        pb = PairBatches(data_dir, split, batch_size, seq_len, seed)
        for _ in range(n_batches):
            yield next(pb)
