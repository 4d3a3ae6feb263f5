"""The curation filters: the configuration, Gopher's quality rules, MinHash/LSH near-duplicate
detection and n-gram decontamination against evaluation texts (the steps `curate.Curator` runs)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..errors import PretuneError
from .text import normalise  # noqa: F401  (curate's exact-duplicate key; the one definition is data/text.py)


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


def words(text: str) -> list[str]:
    """GPT-3's grams: lowercase, whitespace-delimited words with no punctuation."""
    return _NONWORD.sub("", text.lower()).split()


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
