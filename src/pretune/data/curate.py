"""Curating text before tokenization: quality filters, deduplication, decontamination.

The steps, in the order they always run (each sees only what the previous kept):

  quality        Gopher's heuristics (Rae et al. 2021, appendix A.1.1, Table A1): word
                 count, mean word length, symbol-to-word ratio, bullet and ellipsis
                 lines, alphabetic words, stop words, then the repetition filters
                 (duplicate lines and paragraphs, the top 2-4-gram, duplicate 5-10-grams).
                 A document is counted under the first filter it fails.
  exact          exact duplicates: a blake2b digest of the normalised text (NFKC,
                 lowercase, whitespace collapsed); the first copy is kept.
  near           near duplicates: MinHash over word 5-grams (Broder 1997), 128 hash
                 functions in 16 bands x 8 rows (LSH, Indyk & Motwani 1998), as GPT-3
                 (Brown et al. 2020, appendix A) and RefinedWeb (Penedo et al. 2023) do it.
                 A band collision makes a candidate; a candidate is a duplicate when the
                 signatures agree on >= 0.8 of their 128 entries (the estimate of the
                 Jaccard similarity). P(candidate | Jaccard s) = 1 - (1 - s^8)^16:
                 s = 0.5: 0.061, 0.6: 0.23, 0.7: 0.61, 0.8: 0.947, 0.9: 0.9999.
  decontaminate  GPT-3's 13-gram overlap (appendix C): a document that shares a 13-gram
                 of lowercase, punctuation-free words with an evaluation text is dropped
                 ("drop"), or, as GPT-3 did, the colliding n-gram and 200 characters either
                 side are cut out, pieces under 200 characters discarded and a document
                 cut into more than 10 pieces dropped ("cut").

Short evaluation texts: GPT-3 sized its n-gram per benchmark, clamped to [8, 13] words.
Here a text of 13 words or more contributes all its 13-grams; a text of 8 to 12 words
contributes itself whole (its length is the n-gram); a text under 8 words is not
checked (a collision that short is mostly spurious) and is counted as such.

Streaming, constant memory except the dedup index: about 150 bytes per document for
exact, 2 KB per kept document for near (the 512-byte signature, 16 band entries). Hashing is
deterministic (blake2b for words and texts, a seeded numpy generator for the MinHash
functions), never Python's salted `hash()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
import unicodedata
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import PretuneError

STEPS = ("quality", "exact", "near", "decontaminate")
DEFAULT_STEPS = ("quality", "exact", "near")


@dataclass
class CurateConfig:
    """Thresholds of every step; the defaults are the papers' values."""

    min_words: int = 50                  # Gopher: 50 <= words <= 100,000
    max_words: int = 100_000             # Gopher: longer documents are removed too
    min_mean_word_length: float = 3.0    # Gopher: mean word length in [3, 10] characters
    max_mean_word_length: float = 10.0   # longer words are mostly not prose (URLs, code)
    max_symbol_ratio: float = 0.1        # Gopher: (# and ellipses) / words <= 0.1
    max_bullet_lines: float = 0.9        # Gopher: at most 0.9 of the lines start with a bullet
    max_ellipsis_lines: float = 0.3      # Gopher: at most 0.3 of the lines end with an ellipsis
    min_alpha_words: float = 0.8         # Gopher: at least 0.8 of the words hold a letter
    min_stop_words: int = 2              # Gopher: at least 2 of the, be, to, of, and, that, have, with
    max_dup_lines: float = 0.3           # Gopher Table A1: duplicate line fraction
    max_dup_line_chars: float = 0.2      # characters in duplicate lines
    max_dup_paragraphs: float = 0.3      # duplicate paragraph fraction
    max_dup_paragraph_chars: float = 0.2  # characters in duplicate paragraphs
    shingle: int = 5                     # near: words per shingle
    num_perm: int = 128                  # near: MinHash functions
    bands: int = 16                      # near: LSH bands (rows = num_perm / bands)
    threshold: float = 0.8               # near: estimated Jaccard that makes a duplicate
    seed: int = 1                        # near: seed of the MinHash functions
    ngram: int = 13                      # decontaminate: words per n-gram (GPT-3)
    min_eval_words: int = 8              # decontaminate: shorter eval texts are not checked
    mode: str = "drop"                   # decontaminate: drop the document, or cut the n-gram out
    window: int = 200                    # cut: characters removed either side of a collision
    min_piece: int = 200                 # cut: shorter pieces are discarded
    max_pieces: int = 10                 # cut: a document in more pieces is dropped


# Gopher Table A1: the most frequent n-gram's share of the characters, n = 2..4, and the
# share of characters inside duplicated n-grams (each character counted once), n = 5..10.
TOP_NGRAM_MAX = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_MAX = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
BULLETS = ("\u2022", "\u2023", "\u25b6", "\u25cf", "\u25e6", "\u25aa", "\u2043", "\u2219", "-", "*")
ELLIPSES = ("...", "\u2026")

QUALITY_FILTERS = ("word_count", "mean_word_length", "symbol_ratio", "bullet_lines", "ellipsis_lines",
                   "alpha_words", "stop_words", "dup_lines", "dup_line_chars", "dup_paragraphs",
                   "dup_paragraph_chars", *(f"top_{n}gram" for n in TOP_NGRAM_MAX),
                   *(f"dup_{n}gram" for n in DUP_NGRAM_MAX))


# -- words and their hashes ---------------------------------------------------------

_NONWORD = re.compile(r"[^\w\s]|_")
_WS = re.compile(r"\s+")


def words(text: str) -> list[str]:
    """GPT-3's grams: lowercase, whitespace-delimited words with no punctuation."""
    return _NONWORD.sub("", text.lower()).split()


def normalise(text: str) -> str:
    """The form exact duplicates are compared in: NFKC, lowercase, whitespace collapsed."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().lower()


_WORD_HASH: dict[str, int] = {}
_WORD_HASH_CAP = 1 << 18  # a cache, not an index: cleared when full (about 40 MB), so memory stays bounded


def _word_hash(w: str) -> int:
    return int.from_bytes(hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8,
                                          person=b"pretune-word").digest(), "little")


def word_hashes(ws: list[str]) -> np.ndarray:
    """uint64 blake2b hash of each word (cached per distinct word)."""
    cache = _WORD_HASH
    try:
        return np.fromiter(map(cache.__getitem__, ws), np.uint64, len(ws))
    except KeyError:
        if len(cache) > _WORD_HASH_CAP:
            cache.clear()
        for w in set(ws).difference(cache):
            cache[w] = _word_hash(w)
        return np.fromiter(map(cache.__getitem__, ws), np.uint64, len(ws))


_P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial n-gram hash


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014): spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every run of n consecutive words (len(h) - n + 1 of them), order-sensitive."""
    m = len(h) - n + 1
    if m <= 0 or n <= 0:
        return np.empty(0, np.uint64)
    with np.errstate(over="ignore"):
        g = h[:m].copy()
        for k in range(1, n):
            g = g * _P + h[k:k + m]
        return _mix64(g)


# -- MinHash and LSH ------------------------------------------------------------------

class MinHash:
    """Signatures of shingle sets: num_perm hash functions h_j(x) = (a_j x + b_j mod 2^64) >> 32
    (Dietzfelbinger's multiply-add-shift on 32-bit keys, a universal family), each
    signature entry the minimum of h_j over the set. P[entries agree] = Jaccard."""

    def __init__(self, num_perm: int = 128, seed: int = 1, block: int = 2048):
        rng = np.random.Generator(np.random.PCG64(seed))
        self.a = rng.integers(0, 1 << 64, num_perm, dtype=np.uint64, endpoint=False)[:, None] | np.uint64(1)
        self.b = rng.integers(0, 1 << 64, num_perm, dtype=np.uint64, endpoint=False)[:, None]
        self.num_perm, self.block = num_perm, block

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """uint32 (num_perm,) signature of a set of uint64 shingle hashes (all ones when empty)."""
        x = np.unique(shingles >> np.uint64(32))[None, :]  # 32-bit keys
        sig = np.full(self.num_perm, 0xFFFFFFFF, np.uint64)
        with np.errstate(over="ignore"):
            for i in range(0, x.shape[1], self.block):  # bounded temporaries: num_perm x block
                v = (self.a * x[:, i:i + self.block] + self.b) >> np.uint64(32)
                np.minimum(sig, v.min(1), out=sig)
        return sig.astype(np.uint32)

    def of_text(self, text: str, shingle: int = 5) -> np.ndarray:
        return self.signature(shingles(word_hashes(words(text)), shingle))


def shingles(h: np.ndarray, k: int) -> np.ndarray:
    """Word k-gram hashes; a document shorter than k words is one shingle of all its words."""
    return ngram_hashes(h, min(k, len(h))) if len(h) else np.empty(0, np.uint64)


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def candidate_probability(s: float, bands: int = 16, rows: int = 8) -> float:
    """The LSH S-curve: the chance two documents of Jaccard s share at least one band."""
    return 1.0 - (1.0 - s ** rows) ** bands


class LSHIndex:
    """Streaming near-duplicate index: band hash -> kept documents, plus their signatures."""

    def __init__(self, num_perm: int = 128, bands: int = 16, threshold: float = 0.8):
        if bands < 1 or num_perm % bands:
            raise PretuneError(f"{bands} bands do not divide {num_perm} MinHash functions", "--curation.bands",
                               "choose bands dividing num_perm, e.g. 16 for 128")
        self.bands, self.rows, self.threshold = bands, num_perm // bands, threshold
        self.tables: list[dict[int, int | list[int]]] = [{} for _ in range(bands)]
        self.sigs = np.empty((1024, num_perm), np.uint32)
        self.n = 0

    def _keys(self, sig: np.ndarray) -> list[int]:
        m = sig.reshape(self.bands, self.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            h = m[:, 0].copy()
            for k in range(1, self.rows):
                h = h * _P + m[:, k]
            return _mix64(h).tolist()

    def add(self, sig: np.ndarray) -> tuple[int, float]:
        """(index of the kept document it duplicates, estimated Jaccard), or (-1, best estimate)
        after adding it as a new kept document."""
        keys = self._keys(sig)
        cands: set[int] = set()
        for t, k in zip(self.tables, keys):
            v = t.get(k)
            if v is not None:
                cands.update(v) if isinstance(v, list) else cands.add(v)
        best = 0.0
        if cands:
            idx = np.fromiter(cands, np.int64, len(cands))
            est = (self.sigs[idx] == sig).mean(1)
            j = int(est.argmax())
            best = float(est[j])
            if best >= self.threshold:
                return int(idx[j]), best
        if self.n == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.empty_like(self.sigs)])
        self.sigs[self.n] = sig
        for t, k in zip(self.tables, keys):
            v = t.get(k)
            if v is None:
                t[k] = self.n  # one document in most buckets: an int, a list only when shared
            elif isinstance(v, list):
                v.append(self.n)
            else:
                t[k] = [v, self.n]
        self.n += 1
        return -1, best


# -- quality (Gopher) -------------------------------------------------------------------

def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those items)."""
    seen: set[str] = set()
    n_dup = c_dup = c_all = 0
    for it in items:
        c_all += len(it)
        if it in seen:
            n_dup += 1
            c_dup += len(it)
        else:
            seen.add(it)
    return n_dup / max(1, len(items)), c_dup / max(1, c_all)


def quality_failure(text: str, ws: list[str] | None = None, cfg: CurateConfig | None = None,
                    h: np.ndarray | None = None) -> str | None:
    """The name of the first Gopher filter the document fails, or None if it passes all."""
    cfg = cfg or CurateConfig()
    ws = words(text) if ws is None else ws
    n = len(ws)
    if not cfg.min_words <= n <= cfg.max_words:
        return "word_count"
    lens = np.fromiter(map(len, ws), np.int64, n)
    if not cfg.min_mean_word_length <= lens.mean() <= cfg.max_mean_word_length:
        return "mean_word_length"
    raw = text.split()
    symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
    if symbols / max(1, len(raw)) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if lines and sum(ln.startswith(BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_lines:
        return "bullet_lines"
    if lines and sum(ln.endswith(ELLIPSES) for ln in lines) / len(lines) > cfg.max_ellipsis_lines:
        return "ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in raw) / max(1, len(raw)) < cfg.min_alpha_words:
        return "alpha_words"
    if len(STOP_WORDS.intersection(ws)) < cfg.min_stop_words:
        return "stop_words"
    frac, chars = _dup_fraction(lines)
    if frac > cfg.max_dup_lines:
        return "dup_lines"
    if chars > cfg.max_dup_line_chars:
        return "dup_line_chars"
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    frac, chars = _dup_fraction(paras)
    if frac > cfg.max_dup_paragraphs:
        return "dup_paragraphs"
    if chars > cfg.max_dup_paragraph_chars:
        return "dup_paragraph_chars"
    h = word_hashes(ws) if h is None else h
    total = lens.sum()
    csum = np.concatenate([[0], np.cumsum(lens)])
    for k, limit in TOP_NGRAM_MAX.items():  # the most frequent n-gram's characters
        g = ngram_hashes(h, k)
        uniq, first, counts = np.unique(g, return_index=True, return_counts=True)
        j = int(counts.argmax())
        if counts[j] > 1 and counts[j] * (csum[first[j] + k] - csum[first[j]]) / total > limit:
            return f"top_{k}gram"
    for k, limit in DUP_NGRAM_MAX.items():  # characters covered by repeated n-grams, once each
        g = ngram_hashes(h, k)
        _, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
        starts = np.flatnonzero(counts[inv] > 1)
        if not len(starts):
            continue
        cover = np.zeros(n + 1, np.int64)
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + k, -1)
        if lens[np.cumsum(cover[:n]) > 0].sum() / total > limit:
            return f"dup_{k}gram"
    return None


# -- decontamination ----------------------------------------------------------------------

class Decontaminator:
    """The n-grams of the evaluation texts, as sorted uint64 hash tables per length."""

    def __init__(self, texts: Iterable[str], n: int = 13, min_words: int = 8):
        grams: dict[int, list[np.ndarray]] = {}
        self.n, self.min_words = n, min_words
        self.texts = self.too_short = 0
        for t in texts:
            ws = words(t)
            self.texts += 1
            if len(ws) < min_words:
                self.too_short += 1
                continue
            m = min(n, len(ws))
            grams.setdefault(m, []).append(ngram_hashes(word_hashes(ws), m))
        self.tables = {m: np.unique(np.concatenate(v)) for m, v in sorted(grams.items())}

    def __len__(self) -> int:
        return sum(map(len, self.tables.values()))

    def collisions(self, h: np.ndarray) -> list[tuple[int, int]]:
        """(first word, length) of every n-gram of a document found among the evaluation texts."""
        out = []
        for m, table in self.tables.items():
            g = ngram_hashes(h, m)
            if not len(g):
                continue
            pos = np.minimum(np.searchsorted(table, g), len(table) - 1)
            out.extend((int(i), m) for i in np.flatnonzero(table[pos] == g))
        return out


def _cut(text: str, hits: list[tuple[int, int]], cfg: CurateConfig) -> list[str] | None:
    """GPT-3's cut: each colliding n-gram and `window` characters either side removed; the pieces
    of at least `min_piece` characters, or None (drop the document) past `max_pieces` pieces."""
    spans = [m.span() for m in re.finditer(r"\S+", text) if _NONWORD.sub("", m.group().lower())]
    if len(spans) != len(words(text)):
        return None  # cannot place the words in the text: drop rather than guess
    cuts = sorted((max(0, spans[i][0] - cfg.window), min(len(text), spans[i + m - 1][1] + cfg.window))
                  for i, m in hits)
    pieces, pos = [], 0
    for a, b in cuts:
        if a > pos:
            pieces.append(text[pos:a])
        pos = max(pos, b)
    pieces.append(text[pos:])
    pieces = [p.strip() for p in pieces]
    pieces = [p for p in pieces if len(p) >= cfg.min_piece]
    return None if len(pieces) > cfg.max_pieces else pieces


def eval_texts(specs: Iterable[str], splits: tuple[str, ...] = ("test",)) -> tuple[list[str], list[str]]:
    """(texts, a description of each spec): a built-in task or a labelled .csv/.tsv/.jsonl file
    gives the texts of its test split (as `pretune finetune` splits it); a .txt file gives
    every non-empty line."""
    from .tasks import ALIASES, BUILTIN, load_task

    texts, described = [], []
    for spec in specs:
        spec = str(spec).strip()
        if not spec:
            continue
        p = Path(spec).expanduser()
        if spec not in BUILTIN and spec not in ALIASES and p.suffix.lower() in (".txt", ".text"):
            if not p.is_file():
                raise PretuneError("no such evaluation file", spec, "give a built-in task or an existing file")
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
            texts.extend(ln for ln in lines if ln)
            described.append(f"{spec} ({sum(1 for ln in lines if ln)} lines)")
            continue
        task = load_task(spec)  # unknown names fail here, one line
        n = 0
        for s in splits:
            for e in task.split(s):
                texts.append(e.text)
                n += 1
                if e.text_b:
                    texts.append(e.text_b)
        described.append(f"{task.name} {'+'.join(splits)} ({n} examples)")
    return texts, described


# -- the pipeline -----------------------------------------------------------------------

def parse_steps(steps: Iterable[str] | None, decontaminate: bool) -> tuple[str, ...]:
    """Step names -> the steps to run, in the fixed order. "default" = quality, exact, near;
    "all" adds decontaminate when evaluation sets are named."""
    chosen: set[str] = set()
    for s in steps or ():
        s = str(s).strip().lower()
        if s in ("", "none"):
            continue
        if s == "default":
            chosen.update(DEFAULT_STEPS)
        elif s == "all":
            chosen.update(DEFAULT_STEPS + (("decontaminate",) if decontaminate else ()))
        elif s in STEPS:
            chosen.add(s)
        else:
            raise PretuneError(f"unknown curation step '{s}'", "curation steps",
                               f"choose from {', '.join(STEPS)}, default or all")
    if decontaminate:
        chosen.add("decontaminate")
    elif "decontaminate" in chosen:
        raise PretuneError("the decontaminate step needs evaluation sets", "curation steps",
                           "name them with --decontaminate TASK[,TASK] (built-in tasks or files)")
    return tuple(s for s in STEPS if s in chosen)


@dataclass
class _Count:
    documents: int = 0
    bytes: int = 0

    def add(self, text: str) -> None:
        self.documents += 1
        self.bytes += len(text.encode("utf-8", "surrogatepass"))


class Curator:
    """Runs the chosen steps over a stream of documents, counting what each removes.

    `curator(doc, source)` returns the pieces to keep: [] (removed), [doc], or, for
    decontamination in "cut" mode, the pieces left. The dedup indexes persist across
    calls, so sources curated one after another are deduplicated against each other."""

    def __init__(self, steps: Iterable[str] = DEFAULT_STEPS, config: CurateConfig | dict | None = None,
                 eval_sets: Iterable[str] = ()):
        cfg = config if isinstance(config, CurateConfig) else CurateConfig()
        if isinstance(config, dict):
            names = {f.name for f in fields(CurateConfig)}
            for k, v in config.items():
                if k not in names:
                    raise PretuneError(f"unknown curation setting '{k}'", None, f"choose from {', '.join(names)}")
                setattr(cfg, k, v)
        if cfg.mode not in ("drop", "cut"):
            raise PretuneError(f"unknown decontamination mode '{cfg.mode}'", "--curation.mode", "use drop or cut")
        if not 0.0 < cfg.threshold <= 1.0:
            raise PretuneError(f"the near-duplicate threshold must lie in (0, 1], got {cfg.threshold}",
                               "--curation.threshold", "use e.g. 0.8")
        eval_sets = [e for e in eval_sets if str(e).strip()]
        self.steps = parse_steps(steps, bool(eval_sets))
        if not self.steps:
            raise PretuneError("no curation step chosen", "curation steps", f"choose from {', '.join(STEPS)}")
        self.cfg = cfg
        self.minhash = MinHash(cfg.num_perm, cfg.seed) if "near" in self.steps else None
        self.lsh = LSHIndex(cfg.num_perm, cfg.bands, cfg.threshold) if "near" in self.steps else None
        self.exact: set[bytes] = set()
        self.decon, self.eval_described = None, []
        if "decontaminate" in self.steps:
            texts, self.eval_described = eval_texts(eval_sets)
            self.decon = Decontaminator(texts, cfg.ngram, cfg.min_eval_words)
        self.input, self.kept = _Count(), _Count()
        self.removed = {s: _Count() for s in self.steps}
        self.filters = {f: 0 for f in QUALITY_FILTERS}
        self.cut = {"documents": 0, "pieces": 0, "bytes_removed": 0}
        self.seconds = {s: 0.0 for s in ("words", *self.steps)}
        self.per_source: dict[str, dict] = {}

    def __call__(self, doc: str, source: str = "") -> list[str]:
        src = self.per_source.setdefault(source, {"documents": 0, "kept": 0,
                                                  "removed": {s: 0 for s in self.steps}})
        src["documents"] += 1
        self.input.add(doc)
        t = time.perf_counter()
        ws = words(doc)
        h = word_hashes(ws)
        now = time.perf_counter()
        self.seconds["words"] += now - t
        out = [doc]
        for step in self.steps:
            t, gone = now, False
            if step == "quality":
                why = quality_failure(doc, ws, self.cfg, h)
                if why is not None:
                    self.filters[why] += 1
                    gone = True
            elif step == "exact":
                key = hashlib.blake2b(normalise(doc).encode("utf-8", "surrogatepass"), digest_size=16).digest()
                gone = key in self.exact
                self.exact.add(key)
            elif step == "near":
                sig = self.minhash.signature(shingles(h, self.cfg.shingle))
                gone = self.lsh.add(sig)[0] >= 0
            elif step == "decontaminate":
                hits = self.decon.collisions(h)
                if hits:
                    pieces = _cut(doc, hits, self.cfg) if self.cfg.mode == "cut" else None
                    if pieces:
                        self.cut["documents"] += 1
                        self.cut["pieces"] += len(pieces)
                        self.cut["bytes_removed"] += len(doc.encode("utf-8", "surrogatepass")) - sum(
                            len(p.encode("utf-8", "surrogatepass")) for p in pieces)
                        out = pieces
                    else:
                        gone = True
            now = time.perf_counter()
            self.seconds[step] += now - t
            if gone:
                self.removed[step].add(doc)
                src["removed"][step] += 1
                return []
        src["kept"] += 1
        for p in out:
            self.kept.add(p)
        return out

    def wrap(self, name: str, documents: Callable[[], Iterator[str]]) -> Callable[[], Iterator[str]]:
        """A source's documents, curated. The first full pass decides; later passes (a source
        weighted above one epoch is read again) replay the decisions, so a deliberate
        repetition is not taken for duplication and counts are per distinct document."""
        decisions: list[list[str] | None] | None = None

        def curated() -> Iterator[str]:
            nonlocal decisions
            if decisions is not None:
                for doc, keep in zip(documents(), decisions):
                    yield from (keep if keep is not None else [doc])
                return
            made: list[list[str] | None] = []
            for doc in documents():
                out = self(doc, name)
                made.append(None if out == [doc] else out)  # None: kept unchanged (no copy held)
                yield from out
            decisions = made

        return curated

    def report(self) -> dict:
        """What went in, what each step removed, what came out: for meta.json and the CLI."""
        cfg = self.cfg
        removed = {s: asdict(c) for s, c in self.removed.items()}
        if "quality" in removed:
            removed["quality"]["filters"] = {k: v for k, v in self.filters.items() if v}
        if "near" in removed:
            removed["near"].update(rule=f"MinHash word {cfg.shingle}-grams, {cfg.num_perm} functions, "
                                        f"{cfg.bands} bands x {cfg.num_perm // cfg.bands} rows, "
                                        f"estimated Jaccard >= {cfg.threshold}",
                                   seed=cfg.seed)
        if "decontaminate" in removed:
            d = self.decon
            removed["decontaminate"].update(
                rule=f"{cfg.ngram}-gram overlap (whole text for {cfg.min_eval_words}-{cfg.ngram - 1} words), "
                     f"mode {cfg.mode}", eval_sets=self.eval_described, eval_texts=d.texts,
                eval_texts_too_short=d.too_short, eval_ngrams=len(d))
            if cfg.mode == "cut":
                removed["decontaminate"]["cut"] = dict(self.cut)
        return {"steps": list(self.steps), "input": asdict(self.input), "removed": removed,
                "kept": asdict(self.kept), "sources": self.per_source,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                "config": {k: v for k, v in asdict(cfg).items()}}


def format_report(rep: dict) -> str:
    """The report as a small table: one line per step."""
    inp = rep["input"]
    lines = [f"{'step':<14} {'documents':>10} {'bytes':>13} {'% bytes':>8} {'seconds':>8}",
             f"{'input':<14} {inp['documents']:>10,} {inp['bytes']:>13,} {100.0:>8.2f} "
             f"{rep['seconds'].get('words', 0):>8.1f}"]
    for s, r in rep["removed"].items():
        lines.append(f"{'- ' + s:<14} {r['documents']:>10,} {r['bytes']:>13,} "
                     f"{100 * r['bytes'] / max(1, inp['bytes']):>8.2f} {rep['seconds'].get(s, 0):>8.1f}")
        if s == "quality" and r.get("filters"):
            lines.append("    " + ", ".join(f"{k} {v}" for k, v in sorted(r["filters"].items(), key=lambda kv: -kv[1])))
    k = rep["kept"]
    lines.append(f"{'kept':<14} {k['documents']:>10,} {k['bytes']:>13,} "
                 f"{100 * k['bytes'] / max(1, inp['bytes']):>8.2f}")
    return "\n".join(lines)


def curate_cmd(corpus: list[str], out: Path | None = None, steps: list[str] | None = None,
               decontaminate: list[str] | None = None, curation: CurateConfig = None,
               progress: bool = True) -> dict:
    """Curate text (quality filters, exact and near dedup, eval-set decontamination) into a JSONL file.

    Args:
        corpus: built-in sources (builtin = movies, wikipedia, bible; austen only when named), UTF-8
            .txt/.jsonl files or folders; each document is read once
        out: the JSONL file to write ({"text", "source"} per kept document; a .report.json beside it)
        steps: comma-separated steps among quality, exact, near, decontaminate (default: quality,exact,near)
        decontaminate: evaluation sets whose texts must not leak: built-in tasks (their test split),
            labelled .csv/.jsonl files (their test split) or .txt files (every line)
        curation: thresholds (see curate.CurateConfig), e.g. --curation.threshold 0.7
        progress: show a progress bar
    """
    from tqdm.auto import tqdm

    from ..fileio import check_creatable, make_dir
    from .corpora import resolve_corpus

    if out is None:
        raise PretuneError("no output file given", "pretune curate", "add --out FILE.jsonl")
    out = Path(out)
    if out.is_dir():
        raise PretuneError("the output is a folder", str(out), "give a file name, e.g. curated.jsonl")
    check_creatable(out, "the curated file", folder=False)
    cur = Curator(steps or DEFAULT_STEPS, curation or None, decontaminate or ())
    parts = resolve_corpus(list(corpus or ["builtin"]))
    make_dir(out.parent, "the curated file")
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            bar = tqdm(total=sum(q.approx_bytes for q in parts), unit="B", unit_scale=True,
                       disable=not progress, desc="curating", dynamic_ncols=True)
            for q in parts:
                for doc in q.documents():
                    for piece in cur(doc, q.name):
                        f.write(json.dumps({"text": piece, "source": q.name}, ensure_ascii=False) + "\n")
                    bar.update(len(doc.encode("utf-8", "surrogatepass")))
            bar.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise PretuneError(f"cannot write {out.name}: {e.strerror}", str(out), "check free space and permissions")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    rep = cur.report()
    from ..fileio import atomic_write_json
    atomic_write_json(out.with_suffix(".report.json"), rep)
    print(format_report(rep))
    print(f"{out}: {rep['kept']['documents']:,} documents kept of {rep['input']['documents']:,}", file=sys.stderr)
    return rep


def measure_near(pairs: int = 1200, words_per_doc: int = 300, seed: int = 0) -> list[tuple[float, int, float]]:
    """The near step's measured S-curve: pairs of made-up documents with 1 to 40 words replaced,
    grouped by their exact Jaccard (set arithmetic on word 5-grams, rounded to 0.05):
    [(Jaccard, pairs, share removed as near duplicates)]."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("bcdfghjklmnprstvwz"))
    pool = list(dict.fromkeys("".join(rng.choice(letters, 6)) for _ in range(40_000)))

    def grams(ws):
        return {tuple(ws[i:i + 5]) for i in range(len(ws) - 4)}

    bins: dict[float, list[bool]] = {}
    for _ in range(pairs):
        base = [pool[i] for i in rng.choice(len(pool), words_per_doc, replace=False)]
        other = list(base)
        for i in rng.choice(words_per_doc, int(rng.integers(1, 40)), replace=False):
            other[i] = "q" + pool[int(rng.integers(len(pool)))]
        a, b = grams(base), grams(other)
        cur = Curator(["near"])
        cur(" ".join(base))
        bins.setdefault(round(len(a & b) / len(a | b) * 20) / 20, []).append(cur(" ".join(other)) == [])
    return [(s, len(v), float(np.mean(v))) for s, v in sorted(bins.items())]


if __name__ == "__main__":
    print("| exact Jaccard | pairs | removed as near duplicates | LSH P(candidate) |\n| --- | --- | --- | --- |")
    for s, n, share in measure_near():
        if n >= 10:
            print(f"| {s:.2f} | {n} | {share:.2f} | {candidate_probability(s):.3f} |")
